"""Discrete-time floor of the gmm J-gap by dynamic programming on a 2-D grid.

    .venv/bin/python scripts/gmm_floor.py [task overrides, e.g. processes.flow.process.num_steps=40]

Prints the best J reachable on the task's flow sampler (a) with any transition kernel and (b) with
Gaussian transitions of the process's fixed σ_i whose means are free (what every method here
trains). (a) − (b) is the part of the J-gap no method can close. Measured (tasks/gmm.yaml):
N = 10: 0.068, N = 20: 0.037, N = 40: 0.019; 6–14 min on 2 cores.

V_N(x) = r(x); per step i (σ_i = process std, m = μ_ref,i(x) from the base net):
  soft (any transition):       V_i(x) = log E_ξ exp V_{i+1}(m + σ_i ξ)           -> J = E log E[e^r | x0]
  Gaussian, fixed σ_i (ours):  V_i(x) = max_μ E_ξ V_{i+1}(μ + σ_i ξ) − |μ − m|²/(2σ_i²)
J_opt = E_{x0~N(0,I)} V_0(x0). E_ξ by 2-D Gauss–Hermite, V_{i+1} by bilinear interpolation."""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from rsmbench.core.models import Policy
from rsmbench.run import tasks

torch.set_num_threads(2)
cfg = tasks.load("gmm", sys.argv[1:])
proc = tasks.build_process(cfg, "flow")
reward = tasks.build_reward(cfg)
net = tasks.load_base(cfg, "flow").double()
ref = Policy(net, proc, 1.0)
L, h = 11.0, 0.11
g1 = torch.linspace(-L, L, int(round(2 * L / h)) + 1, dtype=torch.float64)
n = len(g1)
X = torch.stack(torch.meshgrid(g1, g1, indexing="xy"), -1).reshape(-1, 2)   # (n*n, 2), x fastest
gh_x, gh_w = np.polynomial.hermite_e.hermegauss(10)                           # probabilists' GH
gh = torch.tensor(np.stack(np.meshgrid(gh_x, gh_x), -1).reshape(-1, 2))
ghw = torch.tensor(np.outer(gh_w, gh_w).reshape(-1))
ghw /= ghw.sum()

def interp(V, pts):  # V (n*n,) on the grid -> values at pts (..., 2)
    img = V.reshape(1, 1, n, n)
    g = (pts / L).reshape(1, -1, 1, 2)
    return F.grid_sample(img, g, mode="bilinear", padding_mode="border", align_corners=True).reshape(pts.shape[:-1])

def W(V, mu, s):  # E_ξ V(μ + sξ), mu (P, 2)
    return (interp(V, mu[:, None, :] + s * gh[None]) * ghw).sum(-1)

def soft(V, m, s):
    return torch.logsumexp(interp(V, m[:, None, :] + s * gh[None]) + ghw.log(), -1)

def gauss(V, m, s, iters=50):
    mu = m.clone()
    for k in range(iters):
        mu = mu.detach().requires_grad_(True)
        w = W(V, mu, s)
        gW, = torch.autograd.grad(w.sum(), mu)
        new = 0.5 * mu.detach() + 0.5 * (m + s * s * gW)
        delta = (new - mu.detach()).abs().max().item()
        mu = new
        if delta < 1e-9:
            break
    with torch.no_grad():
        val = W(V, mu, s) - ((mu - m) ** 2).sum(-1) / (2 * s * s)
    return val, delta

def chunked(fn, V, m, s, size=8192):
    outs = [fn(V, m[k:k + size], s) for k in range(0, len(m), size)]
    if isinstance(outs[0], tuple):
        return torch.cat([o[0] for o in outs]), max(o[1] for o in outs)
    return torch.cat(outs)

with torch.no_grad():
    M = [proc.mean(X, ref(X, i), i) for i in range(proc.num_steps)]
g0 = torch.Generator().manual_seed(3)
x0 = torch.randn(200000, 2, generator=g0, dtype=torch.float64)
with torch.no_grad():
    m0 = proc.mean(x0, ref(x0, 0), 0)
res = {}
for mode in ("soft", "gauss"):
    V = reward(X, None).double()
    for i in reversed(range(proc.num_steps)):
        s = float(proc.sde.std[i])
        if i == 0:
            m = m0
        else:
            m = M[i]
        if mode == "soft":
            with torch.no_grad():
                out = chunked(soft, V, m, s)
            d = 0.0
        else:
            out, d = chunked(gauss, V, m, s)
        if i == 0:
            res[mode] = out.mean().item()
        else:
            V = out
        print(mode, i, f"sigma {s:.4f} fixed-point residual {d:.1e}", flush=True)
    print(mode, "J_opt", res[mode], flush=True)
gt = tasks.ground_truth(cfg, reward)
print(f"J* exact (mixture) {gt.J_star_exact:.4f}; soft DP {res['soft']:.4f}; gaussian DP {res['gauss']:.4f}; "
      f"gaussian restriction costs {res['soft'] - res['gauss']:.4f}")

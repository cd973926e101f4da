"""Differentiable rollouts for reward-backprop methods (DRaFT, AlignProp, ReFL, Adjoint Matching).

A behaviour rollout (``rsmbench.core.rollout.sample``, no grad) stores the initial noise
``states[:, 0]`` and every step noise ξ_i. ``replay`` re-runs the same chain with the *current*
θ from those stored draws,

    x_{i+1} = A_i·x_i + B_i·o_θ(x_i, t_i) + σ_i·ξ_i            (rsmbench.core.process, one affine step)

so at θ = θ† it reproduces the behaviour states exactly, and its final state x_N(θ) is
differentiable in θ. Truncation (DRaFT-K, Clark et al. 2023, arXiv 2309.17400, §4.1; AlignProp,
Prabhudesai et al. 2023, arXiv 2310.03739, §3.2): the first N−K steps run without grad (with the
current θ), only the last K steps build a graph. AlignProp's released loop instead detaches the network
output of every step i with i < a fresh draw (``train_mask``: any set of trained steps; the untrained
steps after the first trained one keep the affine x-path A_i·x_i of the graph, exactly as a
``.detach()`` of their noise prediction does). ``checkpoint=True`` wraps each differentiable
network call in ``torch.utils.checkpoint`` (AlignProp's memory saver): activations are recomputed
in the backward pass, the gradient is unchanged.

Also here: the random truncation draw, the reward gradient at the terminal sample (cached at
sampling time, RSM's ``use_z0`` / ``use_saved_rgrad_x1``), and the forward re-noising used by
DRaFT-LV.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from rsmbench.core.models import Policy


def _call(policy: Policy, x, i: int, cond, use_ckpt: bool):
    if not use_ckpt:
        return policy(x, i, cond)
    return _checkpoint(lambda z: policy(z, i, cond), x, use_reentrant=False)


def replay(policy: Policy, x_start: torch.Tensor, noises: torch.Tensor, cond=None, stochastic=None,
           start_step: int = 0, k: int | None = None, checkpoint: bool = False,
           all_states: bool = False, train_mask=None):
    """Re-run the sampler from stored draws with the current θ; grad only through the last k steps.

    x_start: (B, *shape) state at ``start_step`` (the stored initial noise for start_step = 0);
    noises: (B, n, *shape) the stored ξ of steps start_step … start_step+n−1 (ignored where the
    step is deterministic); stochastic: bool per process step (default all stochastic);
    k: number of trailing steps that carry grad (None: all n); train_mask: bool per replayed step
    (overrides k), the steps whose network output carries grad. Returns the final state, or every
    state (B, n+1, *shape) when ``all_states``.
    """
    process = policy.process
    n = noises.shape[1]
    k = n if k is None else int(k)
    if not 0 <= k <= n:
        raise ValueError(f"truncation k must lie in [0, {n}], got {k}")
    train = [j >= n - k for j in range(n)] if train_mask is None else [bool(v) for v in train_mask]
    if len(train) != n:
        raise ValueError(f"train_mask must have {n} entries, got {len(train)}")
    first = next((j for j, t in enumerate(train) if t), n)  # before it, nothing needs a graph
    sto = torch.ones(process.num_steps, dtype=torch.bool) if stochastic is None else \
        torch.as_tensor(stochastic, dtype=torch.bool)
    grad_on = torch.is_grad_enabled()
    x, states = x_start, [x_start]
    for j in range(n):
        i = start_step + j
        with torch.set_grad_enabled(grad_on and j >= first):
            if train[j]:
                out = _call(policy, x, i, cond, checkpoint and grad_on)
            else:
                with torch.no_grad():
                    out = policy(x, i, cond)
            x, _ = process.step(x, out, i, noises[:, j], stochastic=bool(sto[i]))
        states.append(x)
    return torch.stack(states, dim=1) if all_states else x


def draw_truncation(seed: int, k_min: int, k_max: int) -> int:
    """AlignProp's random truncation: K ~ Uniform{k_min … k_max} from a seeded generator."""
    if not 0 <= k_min <= k_max:
        raise ValueError(f"need 0 <= k_min <= k_max, got ({k_min}, {k_max})")
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(k_min, k_max + 1, (1,), generator=g).item())


def reward_and_grad(reward, x: torch.Tensor, cond=None):
    """(r(x), ∇_x r(x)) per sample, detached: the terminal gradient cached at sampling time."""
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        r = reward(z, cond)
        (g,) = torch.autograd.grad(r.sum(), z)
    return r.detach(), g.detach()


def forward_noise(process, x0: torch.Tensor, i: int, eps: torch.Tensor) -> torch.Tensor:
    """q(x_{t_i} | x0): √ᾱ_t·x0 + √(1−ᾱ_t)·ε (VP diffusion) or (1−t)·x0 + t·ε (rectified flow)."""
    if process.kind == "diffusion":
        ab = process.alphas_cumprod_t[i].to(x0.dtype)
        return torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * eps
    t = process.t[i].to(x0.dtype)
    return (1 - t) * x0 + t * eps

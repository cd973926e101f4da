"""Shared pieces of the zeroth-order conformance tests (tests/conformance/test_<method>.py).

A conformance test evaluates a method's ``original_loss`` (or advantage, or step) on fixed float64
inputs and compares it with the same quantity computed from the authors' formula, transcribed in a few
lines in the test (no copied code), at ``REL`` = 1e-10 relative. Each transcription takes its
constants from a dict; ``assert_sensitive`` shows that multiplying any one of them by 1 + 1e-6 breaks
the agreement, so the test would catch a wrong constant. Where a published constant is too small to
move the value by 1e-10 under such a perturbation (an ε of 1e-8 beside a std of 1), the formula is
checked with a larger test value of that constant, and the published value is pinned separately
(``assert_pinned``), exactly.

Fixed inputs: the equivalence harness's toy (``rsmbench.harness.equivalence``: 2-D states, two prompts
× four seeds, CFG 1.5, float64), with θ moved off θ† after the batch is prepared, so that ratios are
not 1 and clips bind on some rows. Scheduler coefficients in the transcriptions come from diffusers'
schedulers directly, not from ``rsmbench.core.process``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from rsmbench.core.method import get
from rsmbench.harness import equivalence

REL = 1e-10
PERTURB = 1e-6


def rel(ours, theirs) -> float:
    """max|ours − theirs| / max|theirs| (float64)."""
    a = torch.as_tensor(ours, dtype=torch.float64)
    b = torch.as_tensor(theirs, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def perturbed(constants: dict, key: str) -> dict:
    out = dict(constants)
    out[key] = out[key] * (1 + PERTURB)
    return out


def assert_sensitive(ours, theirs_fn, constants: dict, keys=None) -> None:
    """Each constant × (1 + 1e-6) makes ``theirs_fn`` disagree with `ours` by more than ``REL``."""
    for k in keys or constants:
        assert rel(ours, theirs_fn(perturbed(constants, k))) > REL, f"a 1e-6 change of {k!r} goes unnoticed"


def assert_pinned(values: dict, source: dict) -> None:
    """Published constants equal their source's (a non-zero float: rel ≤ 1e-10, and a 1e-6 change of it
    in the source would be noticed; anything else, 0.0 included: exactly)."""
    for k, v in source.items():
        if isinstance(v, float) and v != 0:
            assert abs(values[k] - v) <= REL * abs(v), (k, values[k], v)
            assert abs(values[k] - v * (1 + PERTURB)) > REL * abs(v)
        else:
            assert values[k] == v, (k, values[k], v)


def toy(method_id: str, process: str, hp: dict | None = None, seed: int = 0, shift: float = 0.05):
    """(method, ctx, batch): the harness's float64 toy batch, collected and prepared at θ = θ†, then θ
    moved off θ† by `shift`·N(0, 1) on every parameter (the behaviour θ† stays)."""
    m = get(method_id)
    ctx = equivalence.build_context(m, process, torch.float64, seed, hp)
    batch = equivalence.collect(m, ctx, seed)
    move(ctx, shift)
    return m, ctx, batch


def move(ctx, shift: float, seed: int = 11) -> None:
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in ctx.policy.net.parameters():
            p.add_(shift * torch.randn(p.shape, generator=gen, dtype=torch.float64))


# ---- the authors' per-step Gaussians, transcribed --------------------------------------------------------
def flow_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(num_steps)
    return sch.sigmas.double()


def flow_grpo_sde(sigmas, i, x, v, x_next, a):
    """flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``@ac4c86e:40-70: (mean, std_dev_t,
    log-prob). σ = sigmas[i], dt = sigmas[i+1] − σ (< 0), std_dev_t = √(σ/(1 − σ')), σ' = sigmas[1] where
    σ = 1, times a; mean = x(1 + std²dt/(2σ)) + v(1 + std²(1 − σ)/(2σ))dt; log N with std·√(−dt), mean
    over the non-batch dims."""
    i = torch.as_tensor(i)
    sig = sigmas[i].reshape(-1, *([1] * (x.dim() - 1)))
    sig_prev = sigmas[i + 1].reshape(sig.shape)
    dt = sig_prev - sig
    std = torch.sqrt(sig / (1 - torch.where(sig == 1, sigmas[1], sig))) * a
    mean = x * (1 + std**2 / (2 * sig) * dt) + v * (1 + std**2 * (1 - sig) / (2 * sig)) * dt
    s = std * torch.sqrt(-dt)
    lp = -((x_next - mean) ** 2) / (2 * s**2) - torch.log(s) - math.log(math.sqrt(2 * math.pi))
    return mean, std, lp.mean(dim=tuple(range(1, x.dim())))


def ddim_scheduler(num_steps: int, **config) -> DDIMScheduler:
    cfg = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    cfg.update(config)
    sch = DDIMScheduler(steps_offset=1, set_alpha_to_one=False, clip_sample=False, **cfg)
    sch.set_timesteps(num_steps)
    return sch


def harness_ddim(num_steps: int = 8) -> DDIMScheduler:
    """The harness's diffusion grid (``equivalence.PROCESS_KW``) as a diffusers scheduler."""
    return ddim_scheduler(num_steps, **equivalence.PROCESS_KW["diffusion"]["scheduler"])


def ddim_step(sch: DDIMScheduler, i, x, eps, x_next, eta: float = 1.0):
    """kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``@1958463:93-160 (the
    same step as DanceGRPO's and DPOK's): prev t = clamp(t − T/N, 0, T − 1), x̂0 = (x − √(1−ᾱ)ε)/√ᾱ,
    σ = η·√((1−ᾱ')/(1−ᾱ)·(1 − ᾱ/ᾱ')), mean = √ᾱ'·x̂0 + √(1 − ᾱ' − σ²)·ε; (mean, σ, ⟨log N(x'; mean, σ²)⟩)."""
    i = torch.as_tensor(i)
    t = sch.timesteps[i].long()
    T = sch.config.num_train_timesteps
    t_prev = (t - T // sch.num_inference_steps).clamp(0, T - 1)
    acp = sch.alphas_cumprod.double()
    sh = (-1, *([1] * (x.dim() - 1)))
    ab, abp = acp[t].reshape(sh), acp[t_prev].reshape(sh)
    var = (1 - abp) / (1 - ab) * (1 - ab / abp)
    std = eta * var**0.5
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
    mean = abp**0.5 * x0 + (1 - abp - std**2) ** 0.5 * eps
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, lp.mean(dim=tuple(range(1, x.dim())))


def ppo_rows(adv, ratio, clip):
    """max(−A·ρ, −A·clamp(ρ, 1 − ε, 1 + ε)) per row (ddpo-pytorch ``scripts/train.py``@1958463:544-551)."""
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))


def np_std(x, ddof: float = 0.0):
    """numpy's std with a (possibly fractional) divisor n − ddof."""
    x = np.asarray(x, dtype=np.float64)
    return math.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - ddof))

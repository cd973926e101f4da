"""Shared pieces of the first-order conformance tests (tests/conformance/test_<method>.py).

Each test evaluates a method's ``original_loss`` (value and θ-gradient) on fixed float64 inputs (the
harness's tiny networks, a batch from fixed seeds) and compares it with the same quantity computed
from the authors' code, transcribed in a few lines in the test with the source ``repo/path@commit:line``
in its docstring. Scheduler coefficients are recomputed there from diffusers' ``alphas_cumprod`` as
the authors' code does, not read from ``rsmbench.core.process``. Tolerance: ``TOL`` relative; each
checked constant of a transcription, perturbed by ``PERTURB`` relative, must break the comparison.
"""
from __future__ import annotations

import torch

from rsmbench.core import method as registry
from rsmbench.harness import equivalence as E

TOL = 1e-10
PERTURB = 1e-6


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max|ours − theirs| / max|theirs| (norm-wise, as the harness)."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def mixed_sign_reward(x: torch.Tensor, cond=None) -> torch.Tensor:
    """A smooth reward with both signs on the toy states (SQDF's r > 0 mask must bind on some rows)."""
    return x[:, 0] - 0.5 * x[:, 1] + torch.sin(0.3 * x[:, 1])


def setup(method_id: str, kind: str, hp: dict | None = None, reward=None, seed: int = 0, cfg_scale=None):
    """(method, context, batch) on the harness's toy setting, float64, θ = θ†. ``cfg_scale`` 1 switches
    classifier-free guidance off (where the authors' CFG convention differs from the suite's)."""
    m = registry.get(method_id)
    ctx = E.build_context(m, kind, torch.float64, seed, hp)
    if reward is not None:
        ctx.reward = reward
    if cfg_scale is not None:
        for pol in (ctx.policy, ctx.ref, ctx.behaviour):
            pol.cfg_scale = cfg_scale
    return m, ctx, E.collect(m, ctx, seed)


def setup_on_grid(method_id: str, kind: str, process_kw: dict, hp: dict | None = None, seed: int = 0,
                  cfg_scale=None, reward=None):
    """``setup`` on another sampler grid (e.g. ReFL's 40 steps) with the same tiny networks."""
    from rsmbench.core.models import Policy
    from rsmbench.core.process import make_process

    m = registry.get(method_id)
    ctx = E.build_context(m, kind, torch.float64, seed, hp)
    ctx.process = make_process(kind, **process_kw)
    for name in ("policy", "ref", "behaviour"):
        pol = getattr(ctx, name)
        setattr(ctx, name, Policy(pol.net, ctx.process, pol.cfg_scale if cfg_scale is None else cfg_scale))
    if reward is not None:
        ctx.reward = reward
    return m, ctx, E.collect(m, ctx, seed)


def move_theta(ctx, scale: float = 0.05, seed: int = 3) -> None:
    """θ ← θ + scale·N(0, I): evaluate a ``loss``-kind original off θ† (trust terms are live there)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in ctx.policy.net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def clip_norm(g: torch.Tensor, tau: float, eps: float = 1e-8) -> torch.Tensor:
    """VGG-Flow's per-sample clip g/(‖g‖ + eps)·min(‖g‖, τ) (jaylee2000/rsm@e8be3df
    sd35_first_order/lib/vggflow/reward_gradient.py:161-170; lzzcd001/vggflow@978f1fb the same rule)."""
    n = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).reshape(-1, *([1] * (g.dim() - 1)))
    return g / (n + eps) * n.clamp(max=tau)


def params(ctx):
    return [p for p in ctx.policy.net.parameters() if p.requires_grad]


def value_and_grad(loss: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    return loss.detach(), E.flat_grad(loss, params(ctx))


def perturbed(consts: dict, name: str) -> dict:
    out = dict(consts)
    out[name] = out[name] * (1 + PERTURB)
    return out


# ---- DDIM / DDPM coefficients as the authors' schedulers compute them (diffusers conventions) ------
def ddim_alphas(scheduler, t: torch.Tensor):
    """(ᾱ_t, ᾱ_prev) with prev = t − T/N clamped at 0 (SD1.5's ``set_alpha_to_one=False``: ᾱ_0)."""
    acp = scheduler.alphas_cumprod.double()
    prev = (t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps).clamp(min=0)
    return acp[t], acp[prev]


def ddim_std(scheduler, t, eta):
    """σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)) (DDIM Eq. 16, ``_get_variance``)."""
    ab, ab_prev = ddim_alphas(scheduler, t)
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()


def col(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def ddim_mean(scheduler, x, eps, t, eta):
    """√ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·ε, x̂_0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t (``scheduler.step`` without noise)."""
    ab, ab_prev = ddim_alphas(scheduler, t)
    std = ddim_std(scheduler, t, eta)
    x0 = (x - col((1 - ab).sqrt(), x) * eps) / col(ab.sqrt(), x)
    return col(ab_prev.sqrt(), x) * x0 + col((1 - ab_prev - std**2).sqrt(), x) * eps

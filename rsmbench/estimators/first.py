"""First-order value-guidance estimators (differentiable reward), in native units Ψ̂/a (see
``rsmbench.rsm``; digest §4.1): current-state Tweedie, next-state, k-step lookahead, terminal
Jacobian-free, and the exact adjoint."""
from __future__ import annotations


# ---- reward-backprop family (DRaFT, AlignProp, ReFL, Adjoint Matching, RSM first-order) --------
# Every Ψ̂ below is returned in native units Ψ̂/a (``rsmbench.rsm``) per row of `rows`, with `g` a
# (R, *shape) gradient already gathered per row.

import torch  # noqa: E402


def _row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(v.shape + (1,) * (like.dim() - v.dim()))


def _table(process, rows):
    """Per-row (B_i, σ_i) of the step each row actually took (SDE or ODE table)."""
    B = torch.where(rows.stochastic, process.sde.B[rows.step], process.ode.B[rows.step])
    std = torch.where(rows.stochastic, process.sde.std[rows.step], process.ode.std[rows.step])
    return B, std


def adjoint_pullback(process, rows, adj_next: torch.Tensor, weight=1.0) -> torch.Tensor:
    """Exact full-trajectory estimator (DRaFT / AlignProp, digest §8.11): Ψ̂/a = ω·B_i·a_{i+1}.

    a_{i+1} = d r(x_N)/d x_{i+1} is the exact adjoint of the remaining chain
    (``rsmbench.adjoint.chain_adjoint``); B_i·a_{i+1} = (∂μ_i/∂o)ᵀ·a_{i+1} is its pull-back to the
    step's native output, so −⟨Ψ̂/a·∂o_θ⟩ ∝ −a_{i+1}ᵀ·∂x_{i+1}/∂θ. ω (scalar or (R,)) is the
    per-sample slope −φ'(r) of the method's reward loss φ.
    """
    B, _ = _table(process, rows)
    return _row(torch.as_tensor(weight, dtype=rows.x.dtype) * B.to(rows.x.dtype), adj_next) * adj_next


def tweedie_pullback(process, rows, g_x0: torch.Tensor, weight=1.0) -> torch.Tensor:
    """Current-state Tweedie estimator with the exact output Jacobian (ReFL, digest §8.11):
    Ψ̂/a = ω·(∂x̂₀/∂o)ᵀ·∇r(x̂₀), with ∂x̂₀/∂o = −√(1−ᾱ_t)/√ᾱ_t (ε) or −t (v), read off the
    process's affine Tweedie map. g_x0 = ∇r at x̂₀(x_t, o_θ†) of each row."""
    zero = torch.zeros_like(rows.x)
    jac = process.tweedie(zero, torch.ones_like(rows.x), rows.step) - process.tweedie(zero, zero, rows.step)
    return _row(torch.as_tensor(weight, dtype=rows.x.dtype), g_x0) * jac * g_x0


def stein_shift(process, rows, g_next: torch.Tensor, scale=1.0) -> torch.Tensor:
    """Transition-level (Stein) estimator, digest §2.1/§4.1: the tilted step's mean shift is
    σ_i²·∇_{x'} log h(x'), so Ψ̂ = (σ_i²/Ω_i)·λ·g in score units and Ψ̂/a = λ·σ_i²·g/B_i native.
    g is a gradient at (or propagated to) the next state: the terminal ∇_{x_N} r (RSM first-order
    diffusion, §9.1 ``use_z0``) or minus the lean adjoint (Adjoint Matching)."""
    B, std = _table(process, rows)
    return _row(torch.as_tensor(scale, dtype=rows.x.dtype) * std.to(rows.x.dtype) ** 2 / B.to(rows.x.dtype),
                g_next) * g_next


def terminal_velocity_shift(g_x0: torch.Tensor, scale=1.0) -> torch.Tensor:
    """Terminal Jacobian-free estimator in VGG-Flow's velocity form (§9.2 ``use_saved_rgrad_x1``):
    Ψ̂/a = −λ·g with g = (clipped) ∇_{x_0} r of the row's own trajectory; the temporal factor η(σ)
    is γ (``weights.vgg_eta``). Score units: Ψ̂ = ((1−σ)/σ)·λ·g (a = −(1−σ)/σ)."""
    return -scale * g_x0


def phi_loss(r: torch.Tensor, kind: str = "neg", c: float | None = None) -> torch.Tensor:
    """Per-sample reward loss φ(r) of the backprop methods:
    'neg' −r (DRaFT), 'abs_target' |c − r| (AlignProp aesthetic), 'relu_margin' ReLU(c − r) (ReFL)."""
    if kind == "neg":
        return -r
    if kind == "abs_target":
        return (c - r).abs()
    if kind == "relu_margin":
        return torch.relu(c - r)
    raise ValueError(f"unknown reward loss {kind!r}; choose 'neg', 'abs_target' or 'relu_margin'")


def phi_slope(r: torch.Tensor, kind: str = "neg", c: float | None = None) -> torch.Tensor:
    """ω = −φ'(r), written out analytically (not by autograd of ``phi_loss``)."""
    if kind == "neg":
        return torch.ones_like(r)
    if kind == "abs_target":
        return torch.sign(c - r)
    if kind == "relu_margin":
        return (r < c).to(r.dtype)
    raise ValueError(f"unknown reward loss {kind!r}; choose 'neg', 'abs_target' or 'relu_margin'")

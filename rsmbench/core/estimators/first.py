"""First-order value-guidance estimators (differentiable reward), in native units Ψ̂/a (see
``rsmbench.core.rsm``; derivations §4.1): current-state Tweedie, next-state, k-step lookahead, terminal
Jacobian-free, and the exact adjoint."""
from __future__ import annotations

import torch

from rsmbench.errors import TaskError

# ---- reward-backprop family (DRaFT, AlignProp, ReFL, Adjoint Matching, RSM first-order) --------
# Every Ψ̂ below is returned in native units Ψ̂/a (``rsmbench.core.rsm``) per row of `rows`, with `g` a
# (R, *shape) gradient already gathered per row.


def _row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(v.shape + (1,) * (like.dim() - v.dim()))


def _table(process, rows):
    """Per-row (B_i, σ_i) of the step each row actually took (SDE or ODE table)."""
    B = torch.where(rows.stochastic, process.sde.B[rows.step], process.ode.B[rows.step])
    std = torch.where(rows.stochastic, process.sde.std[rows.step], process.ode.std[rows.step])
    return B, std


def adjoint_pullback(process, rows, adj_next: torch.Tensor, weight=1.0) -> torch.Tensor:
    """Exact full-trajectory estimator (DRaFT / AlignProp, derivations §8.11): Ψ̂/a = ω·B_i·a_{i+1}.

    a_{i+1} = d r(x_N)/d x_{i+1} is the exact adjoint of the remaining chain
    (``rsmbench.core.adjoint.chain_adjoint``); B_i·a_{i+1} = (∂μ_i/∂o)ᵀ·a_{i+1} is its pull-back to the
    step's native output, so −⟨Ψ̂/a·∂o_θ⟩ ∝ −a_{i+1}ᵀ·∂x_{i+1}/∂θ. ω (scalar or (R,)) is the
    per-sample slope −φ'(r) of the method's reward loss φ.
    """
    B, _ = _table(process, rows)
    return _row(torch.as_tensor(weight, dtype=rows.x.dtype) * B.to(rows.x.dtype), adj_next) * adj_next


def tweedie_pullback(process, rows, g_x0: torch.Tensor, weight=1.0) -> torch.Tensor:
    """Current-state Tweedie estimator with the exact output Jacobian (ReFL, derivations §8.11):
    Ψ̂/a = ω·(∂x̂₀/∂o)ᵀ·∇r(x̂₀), with ∂x̂₀/∂o = −√(1−ᾱ_t)/√ᾱ_t (ε) or −t (v), read off the
    process's affine Tweedie map. g_x0 = ∇r at x̂₀(x_t, o_θ†) of each row."""
    zero = torch.zeros_like(rows.x)
    jac = process.tweedie(zero, torch.ones_like(rows.x), rows.step) - process.tweedie(zero, zero, rows.step)
    return _row(torch.as_tensor(weight, dtype=rows.x.dtype), g_x0) * jac * g_x0


def stein_shift(process, rows, g_next: torch.Tensor, scale=1.0) -> torch.Tensor:
    """Transition-level (Stein) estimator, derivations §2.1/§4.1: the tilted step's mean shift is
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


PHI_LOSSES = ("neg", "abs_target", "relu_margin")  # the reward losses φ of ``phi_loss``; the last two need a target


def check_reward_target(hp: dict) -> None:
    """A reward loss with a target ('abs_target', 'relu_margin') needs ``reward_target``."""
    if hp.get("reward_loss") in ("abs_target", "relu_margin") and hp.get("reward_target") is None:
        raise TaskError(f"reward_loss {hp['reward_loss']!r} needs reward_target (a number)")


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

# ---- Tweedie-based estimators (current state, next state, k-step lookahead) -------------------
# Each returns the raw reward gradient G = ∇_x r(x̂0(x)) per row (graph-free, shape of x); the
# method turns G into Ψ̂/a with its own scale (e.g. ``stein_shift``). The network is whichever
# policy the method's authors use (θ, the reference, or a detached θ); gradients flow to x only.


def _tweedie_or_final(policy, x, step, cond, jacobian: bool):
    """x̂0(x) at process step `step` ((R,) long); rows with step ≥ N are final samples: x̂0 = x.
    ``jacobian=False`` detaches the network output, so ∂x̂0/∂x is the map's own coefficient
    (identity for flow's x − t·v, I/√ᾱ_t for diffusion): VGG-Flow's detached-velocity rule."""
    p = policy.process
    step = torch.as_tensor(step).long().reshape(-1)
    final = step >= p.num_steps
    idx = step.clamp(max=p.num_steps - 1)
    out = policy(x, idx, cond)
    x0 = p.tweedie(x, out if jacobian else out.detach(), idx)
    return torch.where(final.reshape(-1, *([1] * (x.dim() - 1))).to(x.device), x, x0)


def _grad_of_reward(reward, fn, x, cond, return_value: bool = False):
    """∇_x r(fn(x)) per sample, detached; with ``return_value`` also r(fn(x)) itself."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        r = reward(fn(x), cond)
        (g,) = torch.autograd.grad(r.sum(), x)
    return (g.detach(), r.detach()) if return_value else g.detach()


def current_state(policy, reward, x, step, cond=None, jacobian: bool = True) -> torch.Tensor:
    """G = ∇_{x_t} r(x̂0(x_t)) (derivations §4.1, current-state / DPS estimator, Table 1's ‡).
    ``jacobian=True``: exact, through o_θ(x_t); False: through the detached output (VGG-Flow)."""
    return _grad_of_reward(reward, lambda z: _tweedie_or_final(policy, z, step, cond, jacobian), x, cond)


def next_state(policy, reward, rows, jacobian: bool = True) -> torch.Tensor:
    """G = ∇_{x'} r(x̂0(x')) at the sampled next state x' = x_{t_{i+1}}, Tweedie at step i+1
    (x̂0 = x' after the last step): ∇-DB's transition-level estimator (derivations §4.1, §8.3)."""
    return current_state(policy, reward, rows.x_next, rows.step + 1, rows.cond, jacobian)


def lookahead(policy, reward, x, step, cond=None, k: int = 1, jacobian: bool = True,
              return_value: bool = False):
    """G = ∇_x r(x̂0(Φ_k(x))): k deterministic steps (DDIM η = 0 / Euler ODE) of `policy` from
    step i, then Tweedie at step i + k (derivations §4.1 lookahead; the RSM toy's SQDF-2 is k = 2).
    Steps past the end stop at the final sample. k = 0 is ``current_state``. ``return_value``:
    (G, r(x̂0(Φ_k(x)))) (SQDF masks its loss with that reward's sign)."""
    if k < 0:
        raise ValueError(f"lookahead depth must be >= 0, got {k}")
    p = policy.process
    step = torch.as_tensor(step).long().reshape(-1)

    def chain(z):
        for j in range(k):
            s = step + j
            live = (s < p.num_steps).reshape(-1, *([1] * (z.dim() - 1)))
            si = s.clamp(max=p.num_steps - 1)
            out = policy(z, si, cond)
            z_next, _ = p.step(z, out if jacobian else out.detach(), si, stochastic=False)
            z = torch.where(live, z_next, z)
        return _tweedie_or_final(policy, z, step + k, cond, jacobian)

    return _grad_of_reward(reward, chain, x, cond, return_value)


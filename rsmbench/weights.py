"""Temporal weights C1(t), γ(t) and trust-region weights C2(t) (digest §5–§7), native units.

KL-natural weight (REINFORCE+KL, digest §8.4): the per-step Gaussian KL is
KL_t = ⟨(μ_θ−μ_ref)²⟩/(2σ²) = (Ω²/2σ²)·⟨(s_θ−s_ref)²⟩ = (w²/2)·⟨(o_θ−o_ref)²⟩, so β·KL_t is the
C1 term with C1 = β·Ω²/(2σ²) in score units, β·w²/2 in native units.
"""
from __future__ import annotations

import torch


def kl_natural(process, rows, beta: float = 1.0) -> torch.Tensor:
    """C1·a² = β·w_t²/2 per row."""
    return beta * process.weight(rows.step).to(rows.x.dtype) ** 2 / 2


# ---- PPO family (KL-free, anchor s_θ†): the per-step credit κ_t and γ = κ_t/w_t ----------------
# A KL-free surrogate whose first-step gradient is A·κ_t·⟨ξ·∂o_θ⟩ (o native) is the RSM instance
# with the likelihood-ratio Ψ̂ (β = 1), C1·a² = w_t²/2 (``kl_natural``, β = 1) and γ = κ_t/w_t:
# −2·C1·γ·Ψ̂ = w_t²·(κ_t/w_t)·A·ξ/w_t = κ_t·A·ξ (digest §7.2, caveat: only C1·γ·Ψ̂ is fixed).

def relative_gamma(process, rows, kappa) -> torch.Tensor:
    """γ = κ_t / w_t per row; κ is a scalar or (R,)."""
    w = process.weight(rows.step).to(rows.x.dtype)
    return torch.as_tensor(kappa, dtype=rows.x.dtype) / w


def kappa_step_size(process, rows, zeta: float) -> torch.Tensor:
    """κ = ζ·Δt_i (PCPO-reweight flow, digest §8.7): credit proportional to the step size."""
    return zeta * process.dt[rows.step].to(rows.x.dtype)


def kappa_guard(process, rows) -> torch.Tensor:
    """κ = c_t = −B_t/Δt_i (GRPO-Guard, digest §8.10): σ_s·w_t/Δt, constant 1 + a²/2 for t < 1."""
    return (-process.sde.B / process.dt)[rows.step].to(rows.x.dtype)

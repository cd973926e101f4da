"""Zeroth-order value-guidance estimators, in native units Ψ̂/a (see ``rsmbench.core.rsm``).

Zeroth-order, single-step likelihood ratio (derivations §4.2, §8.4). For a stochastic step
x' = μ_θ†(x) + σ·ξ with advantage A (reward minus a control variate),

    Ψ̂ = (σ / (β·Ω))·A·ξ                    (score units, Ω = B/a)
    Ψ̂/a = σ·A·ξ/(β·B) = −A·ξ/(β·w),      w = −B/σ   (native units)

The native form is finite at flow's t = 1 where Ω is not.
"""
from __future__ import annotations

import torch


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def likelihood_ratio(process, rows, advantages: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Ψ̂/a = −A·ξ/(β·w_t) per row; `advantages` is (R,) (one A per row)."""
    w = process.weight(rows.step).to(rows.x.dtype)
    return -_per_row(advantages / (beta * w), rows.noise) * rows.noise

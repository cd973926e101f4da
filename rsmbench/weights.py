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

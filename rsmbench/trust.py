"""Hard trust regions: the clipped surrogates of the PPO family, as plain per-row functions.

Every function takes per-row tensors (the (R,) log-ratio Δ = log p_θ − log p_θ†, with log p the
per-element mean ⟨log N⟩ of ``rsmbench.process``, and the (R,) advantage A) and returns the
per-row loss; the caller takes the mean over rows. At θ = θ† (Δ = 0, ρ = 1) no clip binds, so
every surrogate here has the unclipped gradient −A·∇Δ there (digest §6, §8.5).
"""
from __future__ import annotations

import torch


def ppo_clip(ratio: torch.Tensor, adv: torch.Tensor, clip_range: float = 1e-4,
             clip_range_gt: float | None = None) -> torch.Tensor:
    """PPO-clip (Schulman et al. 2017, arXiv 1707.06347, Eq. 7), written as a loss:
    max(−A·ρ, −A·clip(ρ, 1 − ε_lt, 1 + ε_gt)).  ε_gt defaults to ε_lt (symmetric); the
    asymmetric range is Flow-GRPO's ``clip_range_lt`` / ``clip_range_gt``."""
    hi = clip_range if clip_range_gt is None else clip_range_gt
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + hi))


def logrho_clip(log_ratio: torch.Tensor, adv: torch.Tensor, clip_range: float = 1e-4) -> torch.Tensor:
    """PCPO-base's log-ratio PPO objective (Lee & Ye, arXiv 2509.25774, "stable objective
    reformulation"): ρ → 1 + log ρ, i.e. max(−A·(1 + Δ), −A·clip(1 + Δ, 1 − ε, 1 + ε))."""
    r = 1.0 + log_ratio
    return torch.maximum(-adv * r, -adv * torch.clamp(r, 1.0 - clip_range, 1.0 + clip_range))


def matching_clip(neg_log_ratio: torch.Tensor, adv: torch.Tensor, clip_range: float = 1e-4) -> torch.Tensor:
    """PCPO's matching form, max(0, ε·|A| + A·term) with term = −Δ (digest §6, RSM code
    ``loss_type="matching"``). Same gradient as ``logrho_clip`` wherever neither is at a kink;
    the two differ by the constant −A − ε|A| where unclipped."""
    return torch.clamp(clip_range * adv.abs() + adv * neg_log_ratio, min=0.0)


def ratio_norm(log_ratio: torch.Tensor, mean_sq_shift: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (Wang et al., arXiv 2510.22319, §4.1; flow_grpo ``grpo_guard``):
    the normalised ratio exp(σ_s·(Δ + ⟨(μ_θ − μ_θ†)²⟩/(2σ_s²))), σ_s = σ̃√Δt the step std.
    The added term re-centres the log-ratio (its mean under p_θ† is −⟨Δμ²⟩/(2σ_s²)); its
    gradient vanishes at θ†."""
    return torch.exp(step_std * (log_ratio + mean_sq_shift / (2 * step_std**2)))


def clipfrac(ratio: torch.Tensor, clip_range: float, clip_range_gt: float | None = None) -> torch.Tensor:
    """Fraction of rows whose ratio lies outside [1 − ε_lt, 1 + ε_gt] (ddpo-pytorch ``clipfrac``)."""
    hi = clip_range if clip_range_gt is None else clip_range_gt
    return ((ratio < 1.0 - clip_range) | (ratio > 1.0 + hi)).to(ratio.dtype).mean()


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """½⟨(log ρ)²⟩ over rows (ddpo-pytorch / flow_grpo ``approx_kl``)."""
    return 0.5 * (log_ratio**2).mean()


def ppo_stats(log_ratio: torch.Tensor, clip_range: float, clip_range_gt: float | None = None) -> dict:
    """The diagnostics every clipped method reports (detached floats)."""
    lr = log_ratio.detach()
    return {"clipfrac": clipfrac(torch.exp(lr), clip_range, clip_range_gt).item(),
            "approx_kl": approx_kl(lr).item()}

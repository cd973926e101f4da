"""Hard trust regions: the clipped surrogates of the PPO family, as plain per-row functions.

Every function takes per-row tensors (the (R,) log-ratio Δ = log p_θ − log p_θ†, with log p the
per-element mean ⟨log N⟩ of ``rsmbench.core.process``, and the (R,) advantage A) and returns the
per-row loss; the caller takes the mean over rows. At θ = θ† (Δ = 0, ρ = 1) no clip binds, so
every surrogate here has the unclipped gradient −A·∇Δ there (derivations §6, §8.5).
"""
from __future__ import annotations

import torch

from rsmbench.core.rsm import elementwise_mean


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
    """PCPO's matching form, max(0, ε·|A| + A·term) with term = −Δ (derivations §6, RSM code
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


def ppo_stats(log_ratio: torch.Tensor, clip_range: float, clip_range_gt: float | None = None,
              policy_log_ratio: torch.Tensor | None = None) -> dict:
    """The diagnostics every clipped method reports (detached floats): ``clipfrac`` of the clipped
    (possibly rescaled/normalised) log-ratio, ``approx_kl`` = ½⟨Δ²⟩ of the policy's own log-ratio
    Δ = ⟨log p_θ⟩ − ⟨log p_θ†⟩ (``policy_log_ratio``, defaulting to the clipped one)."""
    lr = log_ratio.detach()
    plr = lr if policy_log_ratio is None else policy_log_ratio.detach()
    return {"clipfrac": clipfrac(torch.exp(lr), clip_range, clip_range_gt).item(),
            "approx_kl": approx_kl(plr).item()}


PCPO_FORMS = ("ratio", "logrho", "matching")


def pcpo_loss(process, rows, out: torch.Tensor, adv: torch.Tensor, kappa: torch.Tensor, form: str = "logrho",
              clip_range: float = 1e-4):
    """Per-row PCPO objective (Lee & Ye, arXiv 2509.25774) with per-row credit κ in place of the
    sampler weight w_t (κ = w_t: PCPO-base). Returns (loss_rows, stats).

    "ratio":    Δ̃ = (⟨log p_θ⟩ − ⟨log p_θ†⟩)·κ/w_t, loss = ``ppo_clip``(exp(Δ̃), A): the RSM code's ppo
                path (``sd35_zeroth_order/flow_grpo/sd3_train_shared.py``@e8be3df:88-92, ratio
                exp(Δ·ζΔt/w^b) inside the standard clip);
    "logrho":   the same Δ̃, loss = ``logrho_clip``(Δ̃, A) (PCPO's log-ratio objective, 1 + Δ̃ for ρ);
                the same first-step gradient as "ratio", a different clip threshold off θ† (O(ε²));
    "matching": term = ½⟨(κ·Δo)²⟩ + ⟨(κ·Δo)·ξ⟩, Δo = o_θ − o_θ†, loss = ``matching_clip``(term, A)
                (RSM code ``noise_matching_precision: bad``): the exact −log ρ of a Gaussian step
                with weight κ, so term = −Δ for κ = w_t (PCPO-base, derivations §8.5); for κ ≠ w_t the
                two forms share the first-step gradient A·κ·⟨ξ·∂o⟩ but differ off θ† in the
                quadratic term (½κ² vs ½κw).
    `out` is o_θ on the rows (CFG-combined); ⟨·⟩ per-element means."""
    if form in ("logrho", "ratio"):
        w = process.weight(rows.step).to(out.dtype)
        lp = process.log_prob(rows.x_next, process.mean(rows.x, out, rows.step), rows.step)
        log_ratio = (lp - rows.log_prob) * kappa / w
        loss = logrho_clip(log_ratio, adv, clip_range) if form == "logrho" else \
            ppo_clip(torch.exp(log_ratio), adv, clip_range)
        return loss, ppo_stats(log_ratio, clip_range, None, lp - rows.log_prob)
    if form == "matching":
        k = kappa.reshape(-1, *([1] * (out.dim() - 1)))
        d = k * (out - rows.out_behaviour)
        term = elementwise_mean(0.5 * d**2 + d * rows.noise)
        dw = process.weight(rows.step).to(out.dtype).reshape(k.shape) * (out - rows.out_behaviour)
        policy_log_ratio = -elementwise_mean(0.5 * dw**2 + dw * rows.noise)  # Δ in closed form
        return matching_clip(term, adv, clip_range), ppo_stats(-term, clip_range, None, policy_log_ratio)
    raise ValueError(f"PCPO form must be 'ratio', 'logrho' or 'matching', got {form!r}")


def fair_matching_clip(neg_log_ratio: torch.Tensor, adv: torch.Tensor, step_var: torch.Tensor,
                       clip_range: float = 1e-4) -> torch.Tensor:
    """The RSM redesign's fair clip (flow, derivations §6, §9.4; RSM code ``fair_clip2``):
    max(0, ε·|A| + A·(−Δ)·σ_s²) / σ_s², σ_s² = σ̃²Δt the step variance. The matching clip with a
    per-step threshold: the row stops contributing once A·Δ > ε·|A|/σ_s² (instead of ε·|A|)."""
    return matching_clip(neg_log_ratio * step_var, adv, clip_range) / step_var


def matching_clipfrac(neg_log_ratio: torch.Tensor, adv: torch.Tensor, clip_range: float = 1e-4,
                      step_var: torch.Tensor | float = 1.0) -> float:
    """Fraction of rows where the (fair) matching clip binds: ε·|A| + A·(−Δ)·σ_s² < 0."""
    active = clip_range * adv.abs() + adv * neg_log_ratio.detach() * step_var < 0
    return active.to(torch.float64).mean().item()

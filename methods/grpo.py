"""GRPO for diffusion and flow: DanceGRPO (diffusion) and Flow-GRPO (flow, with its β·KL).

Papers: DanceGRPO, Xue et al. 2025, arXiv 2505.07818, Eq. 6–8 (GRPO on the DDIM-SDE of a diffusion
model; group-normalised advantages, PPO clip, no KL); Flow-GRPO, Liu et al. 2025, arXiv
2505.05470, Eq. 9 (SDE step) and Eq. 12 (clipped objective with β·KL between the SDE step
means, code yifan123/flow_grpo ``scripts/train_sd3.py``: kl = ⟨(μ_θ − μ_ref)²⟩/(2σ_s²)).
Group advantages: GRPO, Shao et al. 2024, arXiv 2402.03300, Eq. 3; flow_grpo ``stat_tracking.py``
(per-prompt mean/std over the batch, eps 1e-4, optional ``global_std``; cleared every epoch).
Table 1 row: "PPO / GRPO / PCPO-base" (digest §7.2, §8.5, §8.11).
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (ρ = 1, clip inactive), on-policy rows,
same x_t and ξ, terminal reward, closed-form per-step Gaussian KL.

Original (per row, mean over rows, ⟨·⟩ per-element means):
    ρ = exp(⟨log p_θ⟩ − ⟨log p_θ†⟩),  L = max(−A·ρ, −A·clip(ρ, 1 − ε_lt, 1 + ε_gt)) + β·KL_t(θ‖ref)
RSM instance (digest §8.5):
    β > 0: Ψ̂/a = −A·ξ/(β·w_t), γ = 1, C1·a² = β·w_t²/2, C2 = 0, anchor s_ref  (as §8.4);
    β = 0: Ψ̂/a = −A·ξ/w_t,     γ = 1, C1·a² = w_t²/2,   C2 = 0, anchor s_θ†.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import per_prompt_advantages
from rsmbench.core.method import Method, register
from rsmbench.core.rsm import RSMSpec


@register
class GRPO(Method):
    id = "grpo"
    processes = ("diffusion", "flow")
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ (β = 0) or (σ/(βΩ))·A·ξ (β > 0), A group-normalised', "gamma": '1',
                 "c1": 'Ω²/(2σ²) anchor s_θ† (β = 0); β·Ω²/(2σ²) anchor s_ref (β > 0)', "c2": '0 (PPO clip)',
                 "branching": False, "current_state": False}
    paper = ("DanceGRPO: Xue et al. 2025, arXiv 2505.07818, Eq. 6-8; Flow-GRPO: Liu et al. 2025, "
             "arXiv 2505.05470, Eq. 9 and Eq. 12; RSM digest §8.5")
    table1 = "PPO / GRPO / PCPO-base"
    kind_reason = ("θ = θ† (ρ = 1, clip inactive), on-policy rows, same x_t and ξ, terminal reward, "
                   "closed-form per-step Gaussian KL (β > 0 anchors on s_ref, β = 0 on s_θ†)")
    defaults = {"clip_range": 1e-4, "clip_range_gt": None, "beta": 0.0, "adv_clip_max": 5.0,
                "global_std": False, "adv_eps": 1e-4}
    presets = {
        "dancegrpo": {"clip_range": 1e-4, "beta": 0.0, "adv_clip_max": 5.0,
                      "source": "XueZeyue/DanceGRPO train_grpo_*.py (--clip_range 1e-4, --adv_clip_max 5.0), no KL"},
        "flow_grpo": {"clip_range": 1e-4, "beta": 0.04, "adv_clip_max": 5.0, "global_std": False,
                      "source": "yifan123/flow_grpo config/grpo.py (train.clip_range 1e-4, train.beta 0.04, "
                                "train.adv_clip_max 5)"},
        "flow_grpo_kl_free": {"clip_range": 1e-4, "beta": 0.0, "adv_clip_max": 5.0, "global_std": True,
                              "source": "yifan123/flow_grpo README: beta=0 variants; sample.global_std"},
    }

    def prepare(self, batch, ctx):
        hp = ctx.hp
        batch.extras["advantages"] = per_prompt_advantages(batch.rewards, batch.cond, hp["adv_clip_max"],
                                                           hp["global_std"], hp["adv_eps"])

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        mu = p.mean(rows.x, out, rows.step)
        log_ratio = p.log_prob(rows.x_next, mu, rows.step) - rows.log_prob
        batch.extras["stats"] = trust.ppo_stats(log_ratio, hp["clip_range"], hp["clip_range_gt"])
        loss = trust.ppo_clip(torch.exp(log_ratio), A, hp["clip_range"], hp["clip_range_gt"])
        if hp["beta"] > 0:
            with torch.no_grad():
                mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step)
            loss = loss + hp["beta"] * p.kl(mu, mu_ref, rows.step)
        return loss.mean()

    def rsm_spec(self, batch, ctx):
        rows, R, beta = batch.rows, len(batch.rows), ctx.hp["beta"]
        A = batch.extras["advantages"][rows.sample]
        b = beta if beta > 0 else 1.0
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(ctx.process, rows, A, b),
                       gamma=torch.ones(R), c1=weights.kl_natural(ctx.process, rows, b),
                       c2=torch.zeros(R), anchor="ref" if beta > 0 else "behaviour")

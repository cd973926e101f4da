"""PCPO-base: the log-ratio ("stable objective reformulation") PPO objective.

Paper: Lee & Ye 2025 (ICLR 2026), "PCPO", arXiv 2509.25774, §3 (ρ → 1 + log ρ in the clipped
objective) and its matching form; RSM code jaylee2000/rsm ``sd15_zeroth_order/train_grpo.py``
(``loss_type="matching"``, ``noise_matching_precision: bad``, ``const_weight: null``), digest §6, §8.5.
Table 1 row: "PPO / GRPO / PCPO-base".
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (log ρ = 0, no clip binds), on-policy rows,
same x_t and ξ, terminal reward. The two original forms have the same gradient everywhere off the
kinks (their values differ by the constant −A − ε|A|); off-policy, rows with A·log ρ > ε|A| drop out.

Original (per row, mean over rows; ⟨·⟩ per-element means; A group-normalised, clipped to ±5):
    form "logrho":   L = max(−A·(1 + log ρ), −A·clip(1 + log ρ, 1 − ε, 1 + ε)),
                     log ρ = ⟨log p_θ(x'|x)⟩ − ⟨log p_θ†(x'|x)⟩
    form "matching": L = max(0, ε|A| + A·term),  term = ½⟨(w_t·Δo)²⟩ + ⟨(w_t·Δo)·ξ⟩ = −log ρ,
                     Δo = o_θ − o_θ†, w_t = −B_t/σ_t (DDPM weight (c1−c2)/σ_t, resp. Flow-GRPO c_t√Δt/σ̃_t)
RSM instance (digest §8.5, KL-free: anchor s_θ†):
    Ψ̂/a = −A·ξ/w_t, γ = 1, C1·a² = w_t²/2, C2 = 0 (clip instead).
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import per_prompt_advantages
from rsmbench.core.method import Method, register
from rsmbench.core.rsm import RSMSpec


@register
class PCPO(Method):
    id = "pcpo"
    processes = ("diffusion", "flow")
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ', "gamma": '1', "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": '0 (log-ratio clip)',
                 "branching": False, "current_state": False}
    paper = "PCPO: Lee & Ye 2025, arXiv 2509.25774, §3 (log-ratio objective); RSM digest §6, §8.5"
    table1 = "PPO / GRPO / PCPO-base"
    kind_reason = "θ = θ† (log ρ = 0, clip inactive), on-policy rows, same x_t and ξ, terminal reward"
    defaults = {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "logrho", "global_std": False}
    presets = {
        "pcpo_base": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "matching",
                      "source": "jaylee2000/rsm sd15_zeroth_order (loss_type matching, noise_matching_precision "
                                "bad, const_weight null, train_do_clip, clip 1e-4); digest §6, §8.5"},
    }

    def prepare(self, batch, ctx):
        hp = ctx.hp
        batch.extras["advantages"] = per_prompt_advantages(batch.rewards, batch.cond, hp["adv_clip_max"],
                                                           hp["global_std"])

    def original_loss(self, batch, ctx):
        rows, p = batch.rows, ctx.process
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        loss, batch.extras["stats"] = trust.pcpo_loss(p, rows, out, A, p.weight(rows.step).to(out.dtype),
                                                      ctx.hp["form"], ctx.hp["clip_range"])
        return loss.mean()

    def rsm_spec(self, batch, ctx):
        rows, R = batch.rows, len(batch.rows)
        A = batch.extras["advantages"][rows.sample]
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(ctx.process, rows, A, 1.0),
                       gamma=torch.ones(R), c1=weights.kl_natural(ctx.process, rows, 1.0),
                       c2=torch.zeros(R), anchor="behaviour")

"""PCPO-reweight: PCPO's log-ratio objective with proportional per-step credit.

Paper: Lee & Ye 2025 (ICLR 2026), "PCPO", arXiv 2509.25774, §3–4 (proportional credit: the
per-step weight of the surrogate is replaced by a schedule proportional to the step size);
RSM code jaylee2000/rsm: diffusion ``sd15_zeroth_order`` (``algorithm: uw-sigma``,
``const_weight: 4.5``, ``weight_scale_factor: 8.70575``; digest §8.6), flow
``sd35_zeroth_order/flow_grpo/sd3_train_shared.py`` (log-ratio × ζΔt/w^b, ζ = 4.3152134639895925;
digest §8.7).
Table 1 rows: "PCPO-reweight (diffusion)" and "PCPO-reweight (flow)".
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (log ρ = 0, no clip binds), on-policy rows,
same x_t and ξ, terminal reward. Note (digest §8.6): the RSM code's SD1.5 sampler uses the
``_get_std`` root for σ, so its own w_t is not 4.5; here the sampler is the process's DDPM step and
the loss uses the constant credit κ = w/s exactly as the code does.

Original (per row, mean over rows, A group-normalised and clipped to ±5), with credit κ_t:
    diffusion: κ = w/s = 4.5/8.70575 (uniform); default form "matching":
        L = max(0, ε|A| + A·(½⟨(κΔε)²⟩ + ⟨κΔε·ξ⟩))
    flow: κ_t = ζ·Δt_i; default form "logrho":
        L = max(−A·(1 + Δ̃), −A·clip(1 + Δ̃, 1 ± ε)),  Δ̃ = (⟨log p_θ⟩ − ⟨log p_θ†⟩)·κ_t/w^b_t
    (either form on either process via ``form``; first-step gradient A·κ_t·⟨ξ·∂o_θ⟩ in both).
RSM instance (digest §7.2, §8.6–8.7; KL-free, anchor s_θ†):
    Ψ̂/a = −A·ξ/w_t,  γ = κ_t/w_t,  C1·a² = w_t²/2,  C2 = 0 (clip instead).
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import per_prompt_advantages
from rsmbench.core.method import Method, register
from rsmbench.core.rsm import RSMSpec

DEFAULT_FORM = {"diffusion": "matching", "flow": "logrho"}


@register
class PCPOReweight(Method):
    id = "pcpo_reweight"
    processes = ("diffusion", "flow")
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ', "gamma": '(w/s)/w_t (diffusion), ζΔt/w^b_t (flow)',
                 "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": '0 (log-ratio / matching clip)', "branching": False,
                 "current_state": False}
    paper = "PCPO: Lee & Ye 2025, arXiv 2509.25774, §3-4 (proportional credit); RSM digest §8.6, §8.7"
    table1 = "PCPO-reweight (diffusion) / PCPO-reweight (flow)"
    kind_reason = "θ = θ† (log ρ = 0, clip inactive), on-policy rows, same x_t and ξ, terminal reward"
    defaults = {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": None, "const_weight": 4.5,
                "weight_scale_factor": 8.70575, "zeta": 4.3152134639895925, "global_std": False}
    presets = {
        "sd15": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "matching", "const_weight": 4.5,
                 "weight_scale_factor": 8.70575,
                 "source": "jaylee2000/rsm sd15_zeroth_order config (algorithm uw-sigma, const_weight 4.5, "
                           "weight_scale_factor 8.70575); digest §8.6"},
        "sd35": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "logrho", "zeta": 4.3152134639895925,
                 "global_std": True,
                 "source": "jaylee2000/rsm sd35_zeroth_order/flow_grpo/sd3_train_shared.py (pcpo reweight, "
                           "ζ = 4.3152134639895925, global_std); digest §8.7, §9.4"},
    }

    @staticmethod
    def kappa(ctx, rows) -> torch.Tensor:
        """Per-row credit κ_t: w/s (diffusion, uniform) or ζ·Δt_i (flow)."""
        hp, p = ctx.hp, ctx.process
        if p.kind == "flow":
            return weights.kappa_step_size(p, rows, hp["zeta"])
        return torch.full((len(rows),), hp["const_weight"] / hp["weight_scale_factor"], dtype=rows.x.dtype)

    def prepare(self, batch, ctx):
        hp = ctx.hp
        batch.extras["advantages"] = per_prompt_advantages(batch.rewards, batch.cond, hp["adv_clip_max"],
                                                           hp["global_std"])

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        form = hp["form"] or DEFAULT_FORM[p.kind]
        loss, batch.extras["stats"] = trust.pcpo_loss(p, rows, out, A, self.kappa(ctx, rows), form, hp["clip_range"])
        return loss.mean()

    def rsm_spec(self, batch, ctx):
        rows, R = batch.rows, len(batch.rows)
        A = batch.extras["advantages"][rows.sample]
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(ctx.process, rows, A, 1.0),
                       gamma=weights.relative_gamma(ctx.process, rows, self.kappa(ctx, rows)),
                       c1=weights.kl_natural(ctx.process, rows, 1.0), c2=torch.zeros(R), anchor="behaviour")

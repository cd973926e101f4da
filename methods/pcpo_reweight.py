"""PCPO-reweight: PCPO's log-ratio objective with proportional per-step credit.

Paper: Lee & Ye 2025 (ICLR 2026), "PCPO", arXiv 2509.25774, §3–4 (proportional credit: the
per-step weight of the surrogate is replaced by a schedule proportional to the step size);
derivations §8.6–8.7. Code: the RSM repository, jaylee2000/rsm@e8be3df:
  diffusion ``sd15_zeroth_order/train_grpo.py`` with ``configs/train/hpsv2_1_lora_grpo.yaml``
    (``algorithm: uw-sigma``, ``const_weight: 4.5``, ``weight_scale_factor: 8.70575076181``,
    ``noise_matching_precision: bad``): term = ½⟨(4.5·Δε/s)²⟩ + ⟨4.5·Δε·ξ/s⟩ in max(0, ε|A| + A·term)
    (:1093-1114), s = 8.70575076181; samples and advantages as in ``methods/pcpo.py`` (population std
    + 1e-8, the last transition not trained);
  flow ``sd35_zeroth_order`` ``--sampler default --reweight pcpo`` (``flow_grpo/sd3_train_shared.py``):
    the ppo path (``--loss ppo``, run_sd3.sh's default) uses ρ̃ = exp(Δ·ζΔt/w^b) inside the standard
    clip (:88-92; w^b = ``compute_base_reweight_factor`` :52-62, ζ = 4.3152134639895925 :7): form
    "ratio", the default here; ``--loss matching`` is term = ½⟨(ζΔt·Δv)²⟩ + ⟨ζΔt·Δv·ξ⟩ (:121-123):
    form "matching"; PCPO's own log-ratio 1 + Δ̃ is form "logrho" (same first-step gradient, clip
    threshold different at O(ε²)). Sampler: global_std True, first ⌊0.99·N⌋ transitions, samples with
    all-zero advantages dropped (``config/sd3_matrix.py``:151-162, ``scripts/train_sd3.py``:414,893-917,958).
Table 1 rows: "PCPO-reweight (diffusion)" and "PCPO-reweight (flow)".
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (log ρ = 0, no clip binds), on-policy rows,
same x_t and ξ, terminal reward.
Deliberate deviations: the RSM code's SD1.5 sampler draws with the ``_get_std`` root σ whenever
``'sigma' in algorithm`` (``diffusion/ddim_step.py``:34-50), so its own w_t is not 4.5 (derivations §8.6);
here the sampler is the process's DDPM step and the loss uses the constant credit κ = w/s exactly as
the code does. KL-free: the SD3.5 default sampler adds β·⟨Δμ²⟩/(2σ̃²) (``scripts/train_sd3.py``:1022-1031,
β 0.01 from its reward preset), which this Table-1 row does not have.

Original (per row, mean over the trained rows, A group-normalised and clipped to ±5), with credit κ_t:
    diffusion: κ = w/s = 4.5/8.70575076181 (uniform); default form "matching":
        L = max(0, ε|A| + A·(½⟨(κΔε)²⟩ + ⟨κΔε·ξ⟩))
    flow: κ_t = ζ·Δt_i; default form "ratio":
        L = max(−A·ρ̃, −A·clip(ρ̃, 1 ± ε)),  ρ̃ = exp((⟨log p_θ⟩ − ⟨log p_θ†⟩)·κ_t/w^b_t)
    (any form on either process via ``form``; first-step gradient A·κ_t·⟨ξ·∂o_θ⟩ in all).
RSM instance (derivations §7.2, §8.6–8.7; KL-free, anchor s_θ†):
    Ψ̂/a = −A·ξ/w_t,  γ = κ_t/w_t,  C1·a² = w_t²/2,  C2 = 0 (clip instead).
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import RSM_SAMPLER as SAMPLER
from rsmbench.core.advantages import RSM_SAMPLER_PARAMS, rsm_sampler_rows
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec

DEFAULT_FORM = {"diffusion": "matching", "flow": "ratio"}


@register
class PCPOReweight(Method):
    id = "pcpo_reweight"
    processes = ("diffusion", "flow")
    published_processes = ("diffusion",)  # PCPO's proportional credit on SD1.5 (arXiv 2509.25774 §4-5)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ', "gamma": '(w/s)/w_t (diffusion), ζΔt/w^b_t (flow)',
                 "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": '0 (log-ratio / matching clip)', "branching": False,
                 "current_state": False}
    paper = "PCPO: Lee & Ye 2025, arXiv 2509.25774, §3-4 (proportional credit); derivations §8.6, §8.7"
    table1 = "PCPO-reweight (diffusion) / PCPO-reweight (flow)"
    kind_reason = "θ = θ† (log ρ = 0, clip inactive), on-policy rows, same x_t and ξ, terminal reward"
    defaults = {"clip_range": hp(1e-4, gt=0), "adv_clip_max": hp(5.0, gt=0, null=True),
                "form": hp(None, choices=trust.PCPO_FORMS, null=True),  # None: DEFAULT_FORM[process]
                "const_weight": hp(4.5, gt=0), "weight_scale_factor": hp(8.70575076181, gt=0),
                "zeta": hp(4.3152134639895925, gt=0), **RSM_SAMPLER_PARAMS}
    strength = "clip_range"  # the log-ratio / matching clip ε
    influence_preset = {"diffusion": "sd15", "flow": "sd35"}
    presets = {
        "sd15": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "matching", "const_weight": 4.5,
                 "weight_scale_factor": 8.70575076181, **SAMPLER["diffusion"],
                 "source": "jaylee2000/rsm@e8be3df sd15_zeroth_order/configs/train/hpsv2_1_lora_grpo.yaml "
                           "(algorithm uw-sigma, const_weight 4.5, weight_scale_factor 8.70575076181, "
                           "noise_matching_precision bad, train_clip_range 1e-4, train_adv_clip_max 5.0), "
                           "train_grpo.py:870 (std + 1e-8), :784-791 (last transition dropped); derivations §8.6"},
        "sd35": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "ratio", "zeta": 4.3152134639895925,
                 **SAMPLER["flow"],
                 "source": "jaylee2000/rsm@e8be3df sd35_zeroth_order run_sd3.sh --sampler default --loss ppo "
                           "--reweight pcpo: flow_grpo/sd3_train_shared.py:7,52-62,88-92 (ζ, w^b, ratio), "
                           "config/sd3_matrix.py:151-162 (global_std True, timestep_fraction 0.99), config/base.py:98 "
                           "(clip_range 1e-4); derivations §8.7"},
    }

    def setting(self, ctx, name):
        v = ctx.hp.get(name)
        return SAMPLER[ctx.process.kind][name] if v is None else v

    def collect(self, ctx, cond, seeds):
        batch = super().collect(ctx, cond, seeds)
        batch.extras["seeds"] = list(seeds)
        return batch

    @staticmethod
    def kappa(ctx, rows) -> torch.Tensor:
        """Per-row credit κ_t: w/s (diffusion, uniform) or ζ·Δt_i (flow)."""
        hp, p = ctx.hp, ctx.process
        if p.kind == "flow":
            return weights.kappa_step_size(p, rows, hp["zeta"])
        return torch.full((len(rows),), hp["const_weight"] / hp["weight_scale_factor"], dtype=rows.x.dtype)

    def prepare(self, batch, ctx):
        batch.extras["advantages"] = rsm_sampler_rows(batch, ctx, lambda name: self.setting(ctx, name))

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

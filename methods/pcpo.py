"""PCPO-base: the log-ratio ("stable objective reformulation") PPO objective.

Paper: Lee & Ye 2025 (ICLR 2026), "PCPO", arXiv 2509.25774, §3 (ρ → 1 + log ρ in the clipped
objective) and its matching form; derivations §6, §8.5. Code: the RSM repository's reimplementation,
jaylee2000/rsm@e8be3df, on its two non-branching samplers:
  diffusion ``sd15_zeroth_order/train_grpo.py``: A = (r − mean)/(std + 1e-8) per prompt group, population
    std (:866-871); the last transition is not stored (:784-791) and the other N − 1 are trained
    (:368, :891-904, :980); matching term ½⟨(w_tΔε/s)²⟩ + ⟨w_tΔε·ξ/s⟩ with the DDPM inference weight
    w_t = (c1 − c2)/σ_t (``compute_inference_weights``, :65-92) at ``const_weight: null``, s = 1, in
    max(0, ε|A| + A·term) (:1093-1114); ``algorithm: logrho``: −A·(1 + log ρ) in the standard clip
    (:1066-1077);
  flow ``sd35_zeroth_order/scripts/train_sd3.py`` (``--sampler default --reweight base``): per-prompt
    tracker with ``global_std`` (``config/sd3_matrix.py``:158-159: True, timestep_fraction 0.99),
    samples with all-zero advantages dropped (:893-917), the first ⌊0.99·N⌋ transitions (:414, :958).
Table 1 row: "PPO / GRPO / PCPO-base".
Deliberate deviation: KL-free. The RSM SD3.5 default sampler adds β·⟨Δμ²⟩/(2σ̃²) (β from its reward
preset, 0.01; geneval 0.004 with σ̃²Δt) to every reweight (``scripts/train_sd3.py``:1022-1031); the
Table-1 PCPO-base row, and this file, have no KL term.
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (log ρ = 0, no clip binds), on-policy rows,
same x_t and ξ, terminal reward. The two original forms have the same gradient everywhere off the
kinks (their values differ by the constant −A − ε|A|); off-policy, rows with A·log ρ > ε|A| drop out.

Original (per row, mean over rows; ⟨·⟩ per-element means; A group-normalised, clipped to ±5):
    form "logrho":   L = max(−A·(1 + log ρ), −A·clip(1 + log ρ, 1 − ε, 1 + ε)),
                     log ρ = ⟨log p_θ(x'|x)⟩ − ⟨log p_θ†(x'|x)⟩
    form "matching": L = max(0, ε|A| + A·term),  term = ½⟨(w_t·Δo)²⟩ + ⟨(w_t·Δo)·ξ⟩ = −log ρ,
                     Δo = o_θ − o_θ†, w_t = −B_t/σ_t (DDPM weight (c1−c2)/σ_t, resp. Flow-GRPO c_t√Δt/σ̃_t)
RSM instance (derivations §8.5, KL-free: anchor s_θ†):
    Ψ̂/a = −A·ξ/w_t, γ = 1, C1·a² = w_t²/2, C2 = 0 (clip instead).
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import RSM_SAMPLER as SAMPLER
from rsmbench.core.advantages import RSM_SAMPLER_PARAMS, rsm_sampler_rows
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec


@register
class PCPO(Method):
    id = "pcpo"
    processes = ("diffusion", "flow")
    published_processes = ("diffusion",)  # SD1.5 (arXiv 2509.25774 §5; the RSM repo's sd15_zeroth_order is "adapted
    # from the PCPO codebase", jaylee2000/rsm sd15_zeroth_order/README.md)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ', "gamma": '1', "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": '0 (log-ratio clip)',
                 "branching": False, "current_state": False}
    paper = "PCPO: Lee & Ye 2025, arXiv 2509.25774, §3 (log-ratio objective); derivations §6, §8.5"
    table1 = "PPO / GRPO / PCPO-base"
    kind_reason = "θ = θ† (log ρ = 0, clip inactive), on-policy rows, same x_t and ξ, terminal reward"
    defaults = {"clip_range": hp(1e-4, gt=0), "adv_clip_max": hp(5.0, gt=0, null=True),
                "form": hp("logrho", choices=trust.PCPO_FORMS), **RSM_SAMPLER_PARAMS}
    strength = "clip_range"  # the log-ratio clip ε
    influence_preset = {"diffusion": "pcpo_base", "flow": "pcpo_base"}
    presets = {
        "pcpo_base": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "matching", **SAMPLER["diffusion"],
                      "source": "jaylee2000/rsm@e8be3df sd15_zeroth_order/train_grpo.py (noise_matching_precision "
                                "bad :1101-1102, train_do_clip :1109-1114, std(unbiased=False) + 1e-8 :870, last "
                                "transition dropped :784-791); configs/train/hpsv2_1_lora_grpo.yaml (train_clip_range "
                                "1e-4, train_adv_clip_max 5.0) with const_weight null, weight_scale_factor 1.0 (the "
                                "values its comments give for the non-uw runs); derivations §6, §8.5"},
        "sd35_base": {"clip_range": 1e-4, "adv_clip_max": 5.0, "form": "matching", **SAMPLER["flow"],
                      "source": "jaylee2000/rsm@e8be3df sd35_zeroth_order run_sd3.sh --sampler default --loss matching "
                                "--reweight base: config/sd3_matrix.py:151-162 (global_std True, timestep_fraction "
                                "0.99), config/base.py:98-100 (clip_range 1e-4), scripts/train_sd3.py:893-917"},
    }

    def setting(self, ctx, name):
        v = ctx.hp.get(name)
        return SAMPLER[ctx.process.kind][name] if v is None else v

    def collect(self, ctx, cond, seeds):
        batch = super().collect(ctx, cond, seeds)
        batch.extras["seeds"] = list(seeds)
        return batch

    def prepare(self, batch, ctx):
        batch.extras["advantages"] = rsm_sampler_rows(batch, ctx, lambda name: self.setting(ctx, name))

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

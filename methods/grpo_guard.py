"""GRPO-Guard: Flow-GRPO with RatioNorm clipping and 1/Δt gradient reweighting.

Paper: Wang, Liang, et al. 2025 (CVPR 2026), "GRPO-Guard: Mitigating Implicit Over-Optimization in
Flow Matching via Regulated Clipping", arXiv 2510.22319, §4.1 (RatioNorm: the per-step log-ratio
is re-centred by its mean-shift bias ⟨(μ_θ − μ_θ†)²⟩/(2σ_s²) and scaled by the step std σ_s so that
its distribution is comparable across steps) and §4.2 (gradient reweighting by 1/Δt to equalise
steps); derivations §8.10. Code: the RSM repository's ``guard`` reweight, jaylee2000/rsm@e8be3df
``sd35_zeroth_order/flow_grpo/sd3_train_shared.py``:94-109 (ratio) and :147-148 (÷ Δt), with
``--sampler default`` (``config/sd3_matrix.py``:151-162: global_std True, timestep_fraction 0.99;
``scripts/train_sd3.py``:414,958 the first ⌊0.99·N⌋ transitions, :893-917 samples with all-zero
advantages dropped; ``config/base.py``:98 clip 1e-4). GRPO-Guard's own release was not found (the audit:
flow_grpo@ac4c86e predates it), so the RSM reimplementation is the reference.
Deliberate deviation: KL-free. That sampler adds β·⟨Δμ²⟩/(2σ̃²) (``scripts/train_sd3.py``:1022-1031, β
0.01 from its reward preset); the Table-1 GRPO-Guard row has no KL term.
Table 1 row: "GRPO-Guard".
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (ρ̂ = 1 and the bias term has zero
gradient there), on-policy rows, same x_t and ξ, terminal reward. Flow only.

Original (per row, mean over rows; ⟨·⟩ per-element means; σ_s = σ̃√Δt the step std):
    ρ̂ = exp(σ_s·(log ρ + ⟨(μ_θ − μ_θ†)²⟩/(2σ_s²))),  L = max(−A·ρ̂, −A·clip(ρ̂, 1 ± ε)) / Δt_i
First-step gradient: A·σ_s·w_t/Δt·⟨ξ·∂v⟩ = A·c_t·⟨ξ·∂v⟩, c_t = 1 + σ̃²(1−t)/(2t) (= 1 at t = 1).
RSM instance (derivations §7.2, §8.10; KL-free, anchor s_θ†):
    Ψ̂/a = −A·ξ/w_t,  γ = c_t/w_t,  C1·a² = w_t²/2,  C2 = 0 (RatioNorm clip instead).
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import RSM_SAMPLER as SAMPLER
from rsmbench.core.advantages import RSM_SAMPLER_PARAMS, rsm_sampler_rows
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec, elementwise_mean


@register
class GRPOGuard(Method):
    id = "grpo_guard"
    processes = ("flow",)
    published_processes = ("flow",)  # SD3.5-M (arXiv 2510.22319 §5; jaylee2000/rsm sd35_zeroth_order --reweight guard)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ', "gamma": 'c_t/w^b_t (= σ̃/√Δt relative to GRPO)',
                 "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": 'RatioNorm clip', "branching": False,
                 "current_state": False}
    paper = ("GRPO-Guard: Wang et al. 2025, arXiv 2510.22319, §4.1 (RatioNorm), §4.2 (1/Δt reweighting); "
             "derivations §8.10")
    table1 = "GRPO-Guard"
    kind_reason = "θ = θ† (normalised ratio 1, its bias term has zero gradient), on-policy rows, same x_t and ξ"
    defaults = {"clip_range": hp(1e-4, gt=0), "adv_clip_max": hp(5.0, gt=0, null=True), **RSM_SAMPLER_PARAMS}
    strength = "clip_range"  # the RatioNorm PPO clip ε
    influence_preset = {"flow": "flow_grpo_guard"}
    presets = {
        "flow_grpo_guard": {"clip_range": 1e-4, "adv_clip_max": 5.0, **SAMPLER["flow"],
                            "source": "jaylee2000/rsm@e8be3df sd35_zeroth_order run_sd3.sh --sampler default --loss "
                                      "ppo --reweight guard: flow_grpo/sd3_train_shared.py:94-109,147-148, "
                                      "config/sd3_matrix.py:151-162 (global_std True, timestep_fraction 0.99), "
                                      "config/base.py:96-98 (adv_clip_max 5, clip_range 1e-4); derivations §8.10"},
    }

    def setting(self, ctx, name):
        v = ctx.hp.get(name)
        return SAMPLER[ctx.process.kind][name] if v is None else v

    def prepare(self, batch, ctx):
        batch.extras["advantages"] = rsm_sampler_rows(batch, ctx, lambda name: self.setting(ctx, name))

    def original_loss(self, batch, ctx):
        rows, p, eps = batch.rows, ctx.process, ctx.hp["clip_range"]
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        mu = p.mean(rows.x, out, rows.step)
        log_ratio = p.log_prob(rows.x_next, mu, rows.step) - rows.log_prob
        s = p.std(rows.step).to(out.dtype)
        ratio = trust.ratio_norm(log_ratio, elementwise_mean((mu - rows.mean) ** 2), s)
        batch.extras["stats"] = trust.ppo_stats(torch.log(ratio), eps, None, log_ratio)
        dt = p.dt[rows.step].to(out.dtype)
        return (trust.ppo_clip(ratio, A, eps) / dt).mean()

    def rsm_spec(self, batch, ctx):
        rows, R, p = batch.rows, len(batch.rows), ctx.process
        A = batch.extras["advantages"][rows.sample]
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, 1.0),
                       gamma=weights.relative_gamma(p, rows, weights.kappa_guard(p, rows)),
                       c1=weights.kl_natural(p, rows, 1.0), c2=torch.zeros(R), anchor="behaviour")

"""GRPO for diffusion and flow: DanceGRPO (diffusion) and Flow-GRPO (flow, with its β·KL).

Papers: DanceGRPO, Xue et al. 2025, arXiv 2505.07818, Eq. 6–8 (GRPO on the DDIM-SDE of a diffusion
model; group-normalised advantages, PPO clip, no KL); Flow-GRPO, Liu et al. 2025, arXiv 2505.05470,
Eq. 9 (SDE step) and Eq. 12 (clipped objective with β·KL). Group advantages: GRPO, Shao et al. 2024,
arXiv 2402.03300, Eq. 3.
Table 1 row: "PPO / GRPO / PCPO-base" (derivations §7.2, §8.5, §8.11).
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (ρ = 1, clip inactive), on-policy rows, same
x_t and ξ, terminal reward, closed-form KL; the trained-step and zero-advantage selections are row
selections made in ``prepare``, shared by both formulations.

The authors' code, as this file follows it (one branch per process; ``BRANCH`` holds each branch's
settings, a hyperparameter left at None takes them):
  diffusion, DanceGRPO (XueZeyue/DanceGRPO@15cc71d ``fastvideo/train_grpo_sd.py``):
    A = (r − mean_g r)/(std_g r + 1e-8) per prompt group g, torch's unbiased std (:540-547);
    per sample, its N transitions in random order and the first ⌊(N−1)·timestep_fraction⌋ of them
    trained (:86, :562-571, :603): at timestep_fraction 1 one random transition per sample is left out;
    PPO clip on clamp(A, ±5) (:639-653); no KL (``config_sd/base.py``:85-90: adv_clip_max 5,
    clip_range 1e-4, timestep_fraction 1.0).
  flow, Flow-GRPO (yifan123/flow_grpo@ac4c86e ``scripts/train_sd3.py``):
    per-prompt tracker (``flow_grpo/stat_tracking.py``: population std + 1e-4; ``global_std``: the std
    of the whole batch, ``config/base.py``:52 True); samples whose advantages are all zero are dropped
    (:797-817); the first ⌊N·timestep_fraction⌋ transitions are trained, in order (:345, :864);
    PPO clip on clamp(A, ±5) (:872-884); and (:895)
        KL = ⟨(μ_θ − μ_ref)²⟩ / (2σ̃²),   σ̃ = a·√(σ/(1−σ))  (``std_dev_t``, sd3_sde_with_logprob.py:47)
    with no Δt: the step std σ̃√Δt enters the log-prob only (sd3_sde_with_logprob.py:59-65). This KL is
    Δt_i times the per-step Gaussian KL ⟨Δμ²⟩/(2σ̃²Δt) (``kl_form="gaussian"``, the process's ``kl``).

Original (per row, mean over the trained rows, ⟨·⟩ per-element means):
    ρ = exp(⟨log p_θ⟩ − ⟨log p_θ†⟩),  L = max(−A·ρ, −A·clip(ρ, 1 − ε_lt, 1 + ε_gt)) + β·KL_i
RSM instance (derivations §8.5), with β_i = β·Δt_i for Flow-GRPO's KL (it is β·Δt_i·(w_i²/2)⟨Δv²⟩) and
β_i = β for the Gaussian one:
    β > 0: Ψ̂/a = −A·ξ/(β_i·w_t), γ = 1, C1·a² = β_i·w_t²/2, C2 = 0, anchor s_ref  (as §8.4);
    β = 0: Ψ̂/a = −A·ξ/w_t,       γ = 1, C1·a² = w_t²/2,     C2 = 0, anchor s_θ†.

Deliberate deviations (the authors' line each departs from):
- Classifier-free guidance: both formulations differentiate the CFG-combined output through both
  branches (``rsmbench.core.models.Policy``, shared by every method), as flow_grpo's later
  ``scripts/train_sd3.py``@74db691 ``compute_log_prob`` does. The version read above detaches the
  unconditional branch (flow_grpo@ac4c86e ``scripts/train_sd3.py``:190); this file follows @74db691.
- DanceGRPO starts every sample of an epoch from one shared initial noise (train_grpo_sd.py:416-436);
  here every sample has its own seed. flow_grpo pads the kept samples with random dropped ones to a
  multiple of ``num_batches_per_epoch`` (train_sd3.py:803-810); here the dropped samples stay dropped.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import (
    TIMESTEP_RULES,
    clip_advantages,
    group_advantages,
    local_advantages,
    nonzero_advantage_mask,
    per_prompt_advantages,
    timestep_mask,
)
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec, elementwise_mean

# The authors' settings of each branch (a hyperparameter left at None takes these).
BRANCH = {
    "diffusion": {"adv_std": "unbiased", "adv_eps": 1e-8, "global_std": False, "kl_form": "gaussian",
                  "timestep_rule": "shuffled", "drop_zero_adv": False},  # DanceGRPO
    "flow": {"adv_std": "population", "adv_eps": 1e-4, "global_std": True, "kl_form": "flow_grpo",
             "timestep_rule": "first", "drop_zero_adv": True},  # Flow-GRPO
}
KL_FORMS = ("flow_grpo", "gaussian")
BRANCH_PARAMS = {"adv_std": hp(None, choices=("unbiased", "population"), null=True),
                 "adv_eps": hp(None, type=float, gt=0), "global_std": hp(None, type=bool),
                 "kl_form": hp(None, choices=KL_FORMS, null=True),
                 "timestep_rule": hp(None, choices=TIMESTEP_RULES, null=True), "drop_zero_adv": hp(None, type=bool)}


@register
class GRPO(Method):
    id = "grpo"
    processes = ("diffusion", "flow")
    published_processes = ("flow",)  # Flow-GRPO on SD3.5-M (arXiv 2505.05470 §5; yifan123/flow_grpo config/grpo.py)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ (β = 0) or (σ/(βΩ))·A·ξ (β > 0), A group-normalised', "gamma": '1',
                 "c1": 'Ω²/(2σ²) anchor s_θ† (β = 0); β·Ω²/(2σ²) anchor s_ref (β > 0)', "c2": '0 (PPO clip)',
                 "branching": False, "current_state": False}
    paper = ("DanceGRPO: Xue et al. 2025, arXiv 2505.07818, Eq. 6-8; Flow-GRPO: Liu et al. 2025, "
             "arXiv 2505.05470, Eq. 9 and Eq. 12; derivations §8.5")
    table1 = "PPO / GRPO / PCPO-base"
    kind_reason = ("θ = θ† (ρ = 1, clip inactive), on-policy rows, same x_t and ξ, terminal reward, "
                   "closed-form KL (β > 0 anchors on s_ref with β_i = β·Δt_i for Flow-GRPO's KL, β = 0 on s_θ†)")
    defaults = {"clip_range": hp(1e-4, gt=0), "clip_range_gt": hp(None, type=float, gt=0), "beta": hp(0.0, ge=0),
                "adv_clip_max": hp(5.0, gt=0, null=True), "timestep_fraction": hp(1.0, gt=0, le=1),
                **BRANCH_PARAMS}  # a branch setting left at None takes BRANCH[process]
    strength = "beta"  # the KL weight; its default 0 needs an explicit grid: 0 (DanceGRPO, Flow-GRPO
    strength_grid = (0.0, 0.01, 0.04, 0.1)  # compressibility), Flow-GRPO's 0.04 (geneval_sd3), a few-fold around it
    influence_preset = {"diffusion": "dancegrpo", "flow": "flow_grpo_kl_free"}
    presets = {
        "dancegrpo": {"clip_range": 1e-4, "beta": 0.0, "adv_clip_max": 5.0, "timestep_fraction": 1.0,
                      "adv_std": "unbiased", "adv_eps": 1e-8, "timestep_rule": "shuffled", "drop_zero_adv": False,
                      "source": "XueZeyue/DanceGRPO@15cc71d fastvideo/config_sd/base.py:85-90 (train.adv_clip_max 5, "
                                "train.clip_range 1e-4, train.timestep_fraction 1.0); fastvideo/train_grpo_sd.py:545 "
                                "(group std() + 1e-8), :86/:562-571/:603 (N − 1 shuffled steps); no KL"},
        "flow_grpo": {"clip_range": 1e-4, "beta": 0.04, "adv_clip_max": 5.0, "global_std": True, "adv_eps": 1e-4,
                      "kl_form": "flow_grpo", "timestep_rule": "first", "timestep_fraction": 0.99,
                      "drop_zero_adv": True,
                      "source": "yifan123/flow_grpo@ac4c86e config/grpo.py:69-104 geneval_sd3 (train.beta 0.04, "
                                "train.timestep_fraction 0.99, sample.global_std True; general_ocr_sd3 :29-67 the "
                                "same), config/base.py:84-86 (adv_clip_max 5, clip_range 1e-4); KL "
                                "scripts/train_sd3.py:895"},
        "flow_grpo_kl_free": {"clip_range": 1e-4, "beta": 0.0, "adv_clip_max": 5.0, "global_std": True,
                              "timestep_fraction": 1.0,
                              "source": "yifan123/flow_grpo@ac4c86e config/grpo.py:7-27 compressibility() on "
                                        "config/base.py (train.beta 0.0 :91, sample.global_std True :52, "
                                        "train.timestep_fraction 1.0 :89, clip_range 1e-4 :86, adv_clip_max 5 :84)"},
    }

    def setting(self, ctx, name):
        """A hyperparameter, or the process's branch setting (``BRANCH``) where it is None."""
        v = ctx.hp.get(name)
        return BRANCH[ctx.process.kind][name] if v is None else v

    def collect(self, ctx, cond, seeds):
        batch = super().collect(ctx, cond, seeds)
        batch.extras["seeds"] = list(seeds)  # DanceGRPO's per-sample step order is drawn from them
        return batch

    def prepare(self, batch, ctx):
        hp, s = ctx.hp, lambda name: self.setting(ctx, name)  # noqa: E731
        if s("kl_form") not in KL_FORMS or (s("kl_form") == "flow_grpo" and ctx.process.kind != "flow"):
            raise ValueError(f"grpo: kl_form {s('kl_form')!r} is not one of {KL_FORMS} for the {ctx.process.kind} "
                             "process ('flow_grpo' needs the flow SDE's σ̃)")
        if s("adv_std") == "unbiased":  # DanceGRPO: torch std() + eps per prompt group
            adv = clip_advantages(group_advantages(batch.rewards, batch.cond, eps=s("adv_eps"), unbiased=True),
                                  hp["adv_clip_max"])
        else:
            adv = per_prompt_advantages(batch.rewards, batch.cond, hp["adv_clip_max"], s("global_std"), s("adv_eps"))
        batch.extras["advantages"] = adv
        keep = timestep_mask(batch.rows, ctx.process.num_steps, hp["timestep_fraction"], s("timestep_rule"),
                             batch.extras.get("seeds"))
        if s("drop_zero_adv") and local_advantages(batch, adv):
            keep &= nonzero_advantage_mask(batch.rows, adv)
        batch.rows = batch.rows.select(keep)

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
            if self.setting(ctx, "kl_form") == "flow_grpo":  # train_sd3.py:895: ⟨Δμ²⟩/(2σ̃²), no Δt
                sig = p.sigma_tilde[rows.step].to(mu.dtype)
                kl = elementwise_mean((mu - mu_ref) ** 2) / (2 * sig**2)
            else:
                kl = p.kl(mu, mu_ref, rows.step)
            loss = loss + hp["beta"] * kl
        return loss.mean()

    def rsm_spec(self, batch, ctx):
        rows, p, R, beta = batch.rows, ctx.process, len(batch.rows), ctx.hp["beta"]
        A = batch.extras["advantages"][rows.sample]
        if beta > 0:  # per-row KL weight: Flow-GRPO's KL is Δt_i × the Gaussian per-step KL
            b = beta * (p.dt[rows.step].to(rows.x.dtype) if self.setting(ctx, "kl_form") == "flow_grpo" else 1.0)
        else:
            b = 1.0
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, b),
                       gamma=torch.ones(R), c1=weights.kl_natural(p, rows, b),
                       c2=torch.zeros(R), anchor="ref" if beta > 0 else "behaviour")

"""DDPO: denoising diffusion policy optimisation with PPO-clip (no KL).

Paper: Black, Janner, Du, Kostrikov, Levine 2023, arXiv 2305.13301, §4.3 Eq. 4 (DDPO_IS: the
importance-sampled per-step policy gradient) with PPO's clipped trust region; code
kvablack/ddpo-pytorch@1958463 ``scripts/train.py``:539-552 (PPO clip on clamp(A, ±adv_clip_max)),
``config/base.py``:85-90 (adv_clip_max 5, clip_range 1e-4, timestep_fraction 1.0: every step trained),
``ddpo_pytorch/stat_tracking.py`` (per-prompt history of the last ``buffer_size`` rewards, the batch's
mean/std until a prompt has ``min_count``, population std + 1e-6), ``config/dgx.py`` (buffer 16 /
min_count 16 for compressibility and incompressibility, :33-36; buffer 32 / min_count 16 for aesthetic,
:56-59). The tracker persists across batches on the method object (``state_dict`` /
``load_state_dict`` carry it through a checkpoint when the training loop calls them).
Table 1 row: not a Table 1 row; it is the "PPO / GRPO / PCPO-base" row on diffusion (derivations §8.5,
§8.11: κ = w_t in native units, i.e. Ω_t/σ_t in score units).
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† (ρ = 1, so no clip binds) with on-policy
rows, the same x_t and ξ in both losses, terminal reward. Off-policy the clip binds once
|ρ − 1| > ε and the clipped rows drop out of the original's gradient but not of the RSM's.

Original (per row = sample × step, mean over rows; ⟨·⟩ per-element mean log-prob as in
ddpo-pytorch's ``ddim_step_with_logprob``):
    ρ = exp(⟨log p_θ(x'|x)⟩ − ⟨log p_θ†(x'|x)⟩),   A = clip(tracker(r), ±adv_clip_max)
    L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))
RSM instance (derivations §8.5, KL-free: anchor s_θ†):
    Ψ̂/a = −A·ξ/w_t (likelihood ratio, β = 1),  γ = 1,  C1·a² = w_t²/2,  C2 = 0 (clip instead).
"""
from __future__ import annotations

from collections import deque

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import PerPromptStatTracker, clip_advantages, group_advantages
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec


@register
class DDPO(Method):
    id = "ddpo"
    processes = ("diffusion",)
    published_processes = ("diffusion",)  # SD1.4 (arXiv 2305.13301 §6; kvablack/ddpo-pytorch)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ, A per-prompt tracked, clipped ±5', "gamma": '1',
                 "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": '0 (PPO clip ε = 1e-4)', "branching": False,
                 "current_state": False}
    paper = "DDPO: Black et al. 2023, arXiv 2305.13301, Eq. 4 (DDPO_IS) + PPO clip; derivations §8.5, §8.11"
    table1 = "not a Table 1 row (derivations §8.11): the PPO / GRPO / PCPO-base row on diffusion"
    kind_reason = "θ = θ† (ρ = 1, clip inactive), on-policy rows, same x_t and ξ, terminal reward"
    defaults = {"clip_range": hp(1e-4, gt=0), "adv_clip_max": hp(5.0, gt=0, null=True),
                "per_prompt_stat_tracking": True, "buffer_size": hp(32, ge=1), "min_count": hp(16, ge=1),
                "adv_eps": hp(1e-6, gt=0)}
    strength = "clip_range"  # the PPO clip ε
    influence_preset = {"diffusion": "ddpo_pytorch"}
    presets = {
        "ddpo_pytorch": {"clip_range": 1e-4, "adv_clip_max": 5.0, "per_prompt_stat_tracking": True,
                         "buffer_size": 32, "min_count": 16,
                         "source": "kvablack/ddpo-pytorch@1958463 config/base.py:85-87 (train.adv_clip_max 5, "
                                   "train.clip_range 1e-4), config/dgx.py:47-60 aesthetic() (per_prompt_stat_tracking "
                                   "buffer_size 32, min_count 16)"},
        "ddpo_pytorch_compressibility": {
            "clip_range": 1e-4, "adv_clip_max": 5.0, "per_prompt_stat_tracking": True, "buffer_size": 16,
            "min_count": 16,
            "source": "kvablack/ddpo-pytorch@1958463 config/base.py:85-87 (train.adv_clip_max 5, train.clip_range "
                      "1e-4), config/dgx.py:8-39 compressibility() / incompressibility() (per_prompt_stat_tracking "
                      "buffer_size 16, min_count 16)"},
    }

    def __init__(self):
        self.tracker = None  # per-prompt history persists across batches, as in ddpo-pytorch

    def state_dict(self) -> dict:
        """The tracker's per-prompt histories (plain lists: ``torch.load(weights_only=True)`` reads them)."""
        return {} if self.tracker is None else {"stats": {int(k): list(v) for k, v in self.tracker.stats.items()},
                                                "buffer_size": self.tracker.buffer_size,
                                                "min_count": self.tracker.min_count, "eps": self.tracker.eps}

    def load_state_dict(self, st: dict) -> None:
        if st:
            self.tracker = PerPromptStatTracker(st["buffer_size"], st["min_count"], eps=st["eps"])
            self.tracker.stats = {k: deque(v, maxlen=st["buffer_size"]) for k, v in st["stats"].items()}

    def prepare(self, batch, ctx):
        hp = ctx.hp
        if hp["per_prompt_stat_tracking"] and batch.cond is not None:
            if self.tracker is None:
                self.tracker = PerPromptStatTracker(hp["buffer_size"], hp["min_count"], eps=hp["adv_eps"])
            adv = self.tracker.update(batch.cond, batch.rewards)
        else:  # ddpo-pytorch: batch z-score, (r − mean)/(std + 1e-8)
            adv = group_advantages(batch.rewards, None, eps=1e-8)
        batch.extras["advantages"] = clip_advantages(adv, hp["adv_clip_max"])

    def original_loss(self, batch, ctx):
        rows, p, eps = batch.rows, ctx.process, ctx.hp["clip_range"]
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        log_ratio = p.log_prob(rows.x_next, p.mean(rows.x, out, rows.step), rows.step) - rows.log_prob
        batch.extras["stats"] = trust.ppo_stats(log_ratio, eps)
        return trust.ppo_clip(torch.exp(log_ratio), A, eps).mean()

    def rsm_spec(self, batch, ctx):
        rows, R = batch.rows, len(batch.rows)
        A = batch.extras["advantages"][rows.sample]
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(ctx.process, rows, A, 1.0),
                       gamma=torch.ones(R), c1=weights.kl_natural(ctx.process, rows, 1.0),
                       c2=torch.zeros(R), anchor="behaviour")

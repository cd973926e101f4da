"""Advantages from terminal rewards: the zeroth-order control variates (derivations §4.2)."""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from rsmbench.core.models import timestep_embedding
from rsmbench.core.params import hp


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor | None = None, normalize: bool = True,
                     eps: float = 1e-4, clip: float | None = None, unbiased: bool = False,
                     zero_std_below: float | None = None) -> torch.Tensor:
    """A = (r − mean_g r) / (std_g r + eps) within each group g (GRPO, Shao et al. 2024, arXiv
    2402.03300, Eq. 3), or r − mean_g r when ``normalize`` is False. ``groups`` None means one group.

    std: the population std (flow_grpo / ddpo-pytorch ``np.std``), or with ``unbiased`` torch's
    ``Tensor.std()`` (N − 1 divisor: DanceGRPO ``train_grpo_sd.py``, BranchGRPO); an unbiased std of a
    one-member group is undefined, and that group gets A = 0 (BranchGRPO: ``len(nodes) <= 1``).
    ``zero_std_below``: A = 0 for a group whose std is below it (BranchGRPO: 1e-6).
    ``clip`` bounds |A| (DDPO ``adv_clip_max``)."""
    groups = torch.zeros_like(rewards, dtype=torch.long) if groups is None else groups
    adv = torch.empty_like(rewards)
    for g in torch.unique(groups):
        m = groups == g
        r = rewards[m]
        a = r - r.mean()
        if not normalize:
            adv[m] = a
            continue
        if unbiased and r.numel() < 2:
            adv[m] = 0.0
            continue
        std = r.std(unbiased=unbiased)
        adv[m] = 0.0 if zero_std_below is not None and std < zero_std_below else a / (std + eps)
    return adv if clip is None else adv.clamp(-clip, clip)


def clip_advantages(adv: torch.Tensor, max_abs: float | None) -> torch.Tensor:
    """Bound |A| by ``max_abs`` (ddpo-pytorch / flow_grpo ``train.adv_clip_max``); None: no clip."""
    return adv if max_abs is None else adv.clamp(-max_abs, max_abs)


class PerPromptStatTracker:
    """Per-prompt reward normalisation across batches (DDPO, Black et al. 2023, arXiv 2305.13301,
    §4.3 / kvablack/ddpo-pytorch ``stat_tracking.py``; Flow-GRPO ``flow_grpo/stat_tracking.py``).

    ``update(prompts, rewards)`` appends each prompt's rewards to its history (the last
    ``buffer_size`` kept; None keeps all, as Flow-GRPO) and returns A = (r − mean) / (std + eps)
    with mean/std (population std) of that prompt's history. While a prompt has fewer than
    ``min_count`` rewards, the batch's own mean and std are used (DDPO). ``global_std`` takes the
    std over the whole batch instead of the prompt's history (Flow-GRPO ``global_std``).
    ddpo-pytorch: buffer 32, min_count 16, eps 1e-6; flow_grpo: no buffer, eps 1e-4.
    """

    def __init__(self, buffer_size: int | None = 32, min_count: int = 16, global_std: bool = False,
                 eps: float = 1e-6):
        self.buffer_size, self.min_count, self.global_std, self.eps = buffer_size, min_count, global_std, eps
        self.stats: dict[int, deque] = {}

    def update(self, prompts, rewards: torch.Tensor) -> torch.Tensor:
        prompts = [int(p) for p in torch.as_tensor(prompts).reshape(-1).tolist()]
        r64 = rewards.detach().to(torch.float64)
        key = torch.tensor(prompts)
        for p in dict.fromkeys(prompts):  # first all histories (flow_grpo order), then the stats
            self.stats.setdefault(p, deque(maxlen=self.buffer_size)).extend(r64[key == p].tolist())
        adv = torch.empty_like(r64)
        for p in dict.fromkeys(prompts):
            hist = torch.tensor(list(self.stats[p]), dtype=torch.float64)
            src = r64 if len(hist) < self.min_count else hist
            std = r64.std(unbiased=False) if self.global_std else src.std(unbiased=False)
            adv[key == p] = (r64[key == p] - src.mean()) / (std + self.eps)
        return adv.to(rewards.dtype)

    def clear(self) -> None:
        self.stats = {}


def per_prompt_advantages(rewards: torch.Tensor, cond=None, adv_clip_max: float | None = 5.0,
                          global_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages as flow_grpo computes them each epoch (tracker cleared every epoch): per-prompt
    z-scores over the batch (``global_std``: batch std), then clipped to ±``adv_clip_max``."""
    cond = torch.zeros(len(rewards), dtype=torch.long) if cond is None else cond
    tracker = PerPromptStatTracker(buffer_size=None, min_count=0, global_std=global_std, eps=eps)
    return clip_advantages(tracker.update(cond, rewards), adv_clip_max)


# ---- which transitions are trained (a row selection, shared by both formulations) ------------------
TIMESTEP_RULES = ("first", "shuffled", "shuffled_drop_last")


def _sample_generator(seed: int, tag: int) -> torch.Generator:
    """A stream of its own for sample `seed` (not the rollout's: that one drew x_T and every ξ)."""
    state = np.random.SeedSequence([int(seed), int(tag)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def timestep_mask(rows, num_steps: int, fraction: float = 1.0, rule: str = "first", seeds=None) -> torch.Tensor:
    """(R,) bool: the transitions of each sample that a method trains (of its N).

    "first":   steps i < ⌊N·f⌋, the same for every sample (flow_grpo ``scripts/train_sd3.py``@ac4c86e:345,
               864; RSM ``sd35_zeroth_order/scripts/train_sd3.py``@e8be3df:414,958): f = 0.99 leaves out the
               last of 10 steps.
    "shuffled": per sample, the first ⌊(N−1)·f⌋ entries of a random permutation of its N transitions
               (DanceGRPO ``fastvideo/train_grpo_sd.py``@15cc71d:86,562-571,603): at f = 1 one transition
               per sample, drawn at random, is left out.
    "shuffled_drop_last": the last transition is not stored, then ⌊(N−1)·f⌋ of a permutation of the
               other N − 1 (RSM ``sd15_zeroth_order/train_grpo.py``@e8be3df:368,784-791,891-904): at f = 1
               every step but the last.
    `seeds` (one per sample; ``rows.sample`` indexes them) seed the permutations, one stream per sample."""
    if rule not in TIMESTEP_RULES:
        raise ValueError(f"timestep rule must be one of {TIMESTEP_RULES}, got {rule!r}")
    if rule == "first":
        return rows.step < int(num_steps * fraction)
    n_keep = int((num_steps - 1) * fraction)
    pool = num_steps if rule == "shuffled" else num_steps - 1
    if n_keep >= pool:
        return rows.step < pool
    if seeds is None:
        raise ValueError(f"timestep rule {rule!r} with fraction {fraction} needs the samples' seeds")
    keep = torch.zeros(len(rows), dtype=torch.bool)
    for b in torch.unique(rows.sample).tolist():
        kept = torch.randperm(pool, generator=_sample_generator(seeds[b], 0x5EED))[:n_keep]
        m = rows.sample == b
        keep[m] = torch.isin(rows.step[m], kept)
    return keep


def local_advantages(batch, adv: torch.Tensor) -> bool:
    """Whether ``adv`` has one entry per sample of this batch's rollout. Under DDP
    (``rsmbench.run.distributed.collect``) ``prepare`` sees the gathered rewards of every process but
    only this process's rows, and not its shard's offset: a per-sample mask cannot be applied there,
    so the zero-advantage samples stay (their policy term is zero; the KL term and the row count differ)."""
    return batch.rollout is None or len(adv) == batch.rollout.batch_size


def nonzero_advantage_mask(rows, adv: torch.Tensor) -> torch.Tensor:
    """(R,) bool: the rows whose sample (``rows.sample``) has A ≠ 0. flow_grpo drops the samples whose
    advantages are all zero (``scripts/train_sd3.py``@ac4c86e:797-817, and pads the kept set with random
    dropped ones to a multiple of ``num_batches_per_epoch``, not done here); the RSM code masks rows with
    A = 0 (``sd35_zeroth_order/scripts/train_sd3_pr.py``@e8be3df:1444-1446). When every A is zero, all
    rows are kept (the RSM code's fallback, train_sd3_pr.py:1445-1446)."""
    keep = adv[rows.sample] != 0
    return keep if keep.any() else torch.ones_like(keep)


# The RSM code's two non-branching samplers, on which its PCPO, PCPO-reweight and GRPO-Guard run
# (jaylee2000/rsm@e8be3df): SD1.5 ``sd15_zeroth_order/train_grpo.py`` (population std + 1e-8 per prompt
# group :866-871; the last transition not stored :784-791) and SD3.5 ``sd35_zeroth_order/scripts/train_sd3.py``
# with ``--sampler default`` (``config/sd3_matrix.py``:151-162: global_std True, timestep_fraction 0.99;
# the flow_grpo tracker's std + 1e-4; samples with all-zero advantages dropped :893-917).
RSM_SAMPLER = {
    "diffusion": {"adv_eps": 1e-8, "global_std": False, "timestep_fraction": 1.0,
                  "timestep_rule": "shuffled_drop_last", "drop_zero_adv": False},
    "flow": {"adv_eps": 1e-4, "global_std": True, "timestep_fraction": 0.99, "timestep_rule": "first",
             "drop_zero_adv": True},
}
# The hyperparameters of a method that samples as these do: None takes the process's RSM_SAMPLER value.
RSM_SAMPLER_PARAMS = {"adv_eps": hp(None, type=float, gt=0), "global_std": hp(None, type=bool),
                      "timestep_fraction": hp(None, type=float, gt=0, le=1),
                      "timestep_rule": hp(None, choices=TIMESTEP_RULES, null=True),
                      "drop_zero_adv": hp(None, type=bool)}


def rsm_sampler_rows(batch, ctx, setting) -> torch.Tensor:
    """Per-sample advantages as those samplers compute them (``per_prompt_advantages`` with the
    setting's ``global_std``/``adv_eps``, clipped to ±``adv_clip_max``), and the batch's rows restricted
    in place to the trained ones (``timestep_mask``, then ``nonzero_advantage_mask`` if
    ``drop_zero_adv``). `setting(name)` reads a hyperparameter with its sampler default."""
    adv = per_prompt_advantages(batch.rewards, batch.cond, ctx.hp["adv_clip_max"], setting("global_std"),
                                setting("adv_eps"))
    keep = timestep_mask(batch.rows, ctx.process.num_steps, setting("timestep_fraction"), setting("timestep_rule"),
                         batch.extras.get("seeds"))
    if setting("drop_zero_adv") and local_advantages(batch, adv):
        keep &= nonzero_advantage_mask(batch.rows, adv)
    batch.rows = batch.rows.select(keep)
    return adv


class ValueMLP(torch.nn.Module):
    """V(x_t, t, c): a small MLP on the flattened state, a sinusoidal step embedding and an optional
    prompt embedding (DPOK's ``ValueMulti`` is a conv net on SD latents; this is its shape-agnostic
    tiny counterpart)."""

    def __init__(self, dim: int, hidden: int = 64, temb: int = 16, num_classes: int = 0):
        super().__init__()
        self.temb = temb
        self.cond = torch.nn.Embedding(num_classes + 1, temb) if num_classes else None
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + temb, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x, t, cond=None):
        h = timestep_embedding(t.to(x.dtype), self.temb)
        if self.cond is not None and cond is not None:
            h = h + self.cond(cond)
        return self.net(torch.cat([x.reshape(x.shape[0], -1), h], dim=1)).squeeze(1)

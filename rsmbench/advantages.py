"""Advantages from terminal rewards: the zeroth-order control variates (digest §4.2)."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor | None = None, normalize: bool = True,
                     eps: float = 1e-4, clip: float | None = None) -> torch.Tensor:
    """A = (r − mean_g r) / (std_g r + eps) within each group g (GRPO, Shao et al. 2024, arXiv
    2402.03300, Eq. 3; std is the population std), or r − mean_g r when ``normalize`` is False.
    ``groups`` None means one group. ``clip`` bounds |A| (DDPO ``adv_clip_max``)."""
    groups = torch.zeros_like(rewards, dtype=torch.long) if groups is None else groups
    adv = torch.empty_like(rewards)
    for g in torch.unique(groups):
        m = groups == g
        r = rewards[m]
        a = r - r.mean()
        adv[m] = a / (r.std(unbiased=False) + eps) if normalize else a
    return adv if clip is None else adv.clamp(-clip, clip)

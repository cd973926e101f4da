"""Advantages from terminal rewards: the zeroth-order control variates (digest §4.2)."""
from __future__ import annotations

from collections import deque

import torch

from rsmbench.core.models import timestep_embedding


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


def fit_value_baseline(x: torch.Tensor, t: torch.Tensor, targets: torch.Tensor, cond=None, steps: int = 200,
                       lr: float = 1e-2, hidden: int = 64, num_classes: int = 0, seed: int = 0):
    """Train V(x_t, t, c) by full-batch Adam on the MSE to the rows' terminal rewards (DPOK,
    Fan et al. 2023, arXiv 2305.16381, Algorithm 1 / google-research/dpok ``_train_value_func``:
    ``F.mse_loss(value_function(state, txt_emb, timestep), final_reward)``). Returns (V on the rows
    (detached), the fitted module). Initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        v = ValueMLP(x[0].numel(), hidden, num_classes=num_classes).to(x.dtype)
    opt = torch.optim.Adam(v.parameters(), lr=lr)
    x, targets = x.detach(), targets.detach()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(v(x, t, cond), targets).backward()
        opt.step()
    with torch.no_grad():
        return v(x, t, cond), v

"""Generic compute accounting: reward queries and network evaluations (NFEs) are counted by wrapping
the reward and the three policies, so every method is accounted alike, whatever its rollout."""
from __future__ import annotations

from dataclasses import dataclass

from rsmbench.core.models import Policy


@dataclass
class Counters:
    reward_queries: int = 0
    nfe: int = 0
    wall_time: float = 0.0


class CountingPolicy(Policy):
    """A Policy that adds its network evaluations (samples × CFG branches) to a counter."""

    def __init__(self, net, process, cfg_scale, counters: Counters):
        super().__init__(net, process, cfg_scale)
        self.counters = counters

    def __call__(self, x, i, cond=None):
        self.counters.nfe += x.shape[0] * (2 if cond is not None and self.cfg_scale != 1.0 else 1)
        return super().__call__(x, i, cond)


class CountingReward:
    """Forwards to a reward and counts its queries (one per sample)."""

    def __init__(self, reward, counters: Counters):
        self._reward, self.counters = reward, counters

    def __call__(self, x, cond=None):
        self.counters.reward_queries += x.shape[0]
        return self._reward(x, cond)

    def __getattr__(self, name):
        return getattr(self._reward, name)

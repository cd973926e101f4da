"""Rewards of the `gmm` task, each with its exact tilt of a Gaussian mixture (``rsmbench.data.gmm``).

- ``gmm_linear``: the RSM toy reward r(x) = −x₁/2 + 3 with α = 1 (arXiv 2604.17415, derivations §4.3);
  the tilt shifts every component by s²·b/α = (−½, 0) and reweights them ∝ (e^{−1.5}, e^{1.5}, 1).
- ``gmm_quadratic``: r(x) = r0 − (λ/2)‖x − c‖², whose tilt of a Gaussian mixture is again a
  Gaussian mixture (precision 1/s² + λ/α).
Both are differentiable; ``features`` are the raw coordinates (diversity, prior preservation).
"""
from __future__ import annotations

import torch

from rewards import register_reward
from rsmbench.data import gmm


class _Reward:
    differentiable = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)


class LinearReward(_Reward):
    name = "gmm_linear"

    def __init__(self, b=(-0.5, 0.0), r0: float = 3.0):
        self.b, self.r0 = tuple(float(v) for v in b), float(r0)
        self.title = f"linear r(x) = {self.b[0]:g}·x1 + {self.b[1]:g}·x2 + {self.r0:g}"

    def __call__(self, x, cond=None):
        return x @ torch.as_tensor(self.b, dtype=x.dtype) + self.r0

    def tilt(self, mixture, alpha: float):
        return gmm.tilt_linear(mixture, self.b, self.r0, alpha)


class QuadraticReward(_Reward):
    name = "gmm_quadratic"

    def __init__(self, center=(0.0, 2.0), lam: float = 0.25, r0: float = 0.0):
        self.center, self.lam, self.r0 = tuple(float(v) for v in center), float(lam), float(r0)
        self.title = f"quadratic r(x) = {self.r0:g} − {self.lam:g}/2·‖x − {self.center}‖²"

    def __call__(self, x, cond=None):
        c = torch.as_tensor(self.center, dtype=x.dtype)
        return self.r0 - 0.5 * self.lam * ((x - c) ** 2).sum(dim=1)

    def tilt(self, mixture, alpha: float):
        return gmm.tilt_quadratic(mixture, self.center, self.lam, self.r0, alpha)


@register_reward("gmm_linear")
def _linear(**cfg):
    return LinearReward(**cfg)


@register_reward("gmm_quadratic")
def _quadratic(**cfg):
    return QuadraticReward(**cfg)

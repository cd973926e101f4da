"""Reward-gradient norm clipping: fixed threshold and VGG-Flow's adaptive quantile rule.

Per-sample clipping (VGG-Flow code, ``RewardGradientComputer.clip_gradient``; RSM repo
``sd35_first_order/lib/vggflow/reward_gradient.py``): with n = ‖g‖₂ over the sample's elements
(a sum-norm, not a mean),

    clip(g; τ) = g / (n + 1e-8) · min(n, τ).

Note the 1e-8: an unclipped g is scaled by n/(n + 1e-8), exactly as the authors' code does.

Adaptive threshold (VGG-Flow ``train_vggflow.py`` / ``VGGFlowTrainer._aggregate_and_log_metrics``):
τ is reset to 1.0 at the start of every epoch (sampling phase); after each optimizer step it is
replaced by the 0.8-quantile (``torch.quantile``, linear interpolation) of the *unclipped* norms
recorded since the previous step. With one optimizer step per epoch, τ stays 1.0 in practice.
"""
from __future__ import annotations

import torch

from rsmbench.errors import TaskError


def sample_norms(g: torch.Tensor) -> torch.Tensor:
    """‖g_b‖₂ over every non-batch dimension, per sample."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)


def clip_by_norm(g: torch.Tensor, threshold: float, eps: float = 1e-8) -> torch.Tensor:
    """g / (‖g‖ + eps) · min(‖g‖, τ), per sample (VGG-Flow's formula, eps included)."""
    n = sample_norms(g).reshape(-1, *([1] * (g.dim() - 1)))
    return g / (n + eps) * n.clamp(max=threshold)


class FixedClip:
    """Per-sample norm clipping at a constant threshold τ (``None``: no clipping)."""

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def __call__(self, g: torch.Tensor, record: bool = True) -> torch.Tensor:
        return g if self.threshold is None else clip_by_norm(g, self.threshold)

    def reset(self) -> None:  # same interface as QuantileClip
        pass

    def step(self) -> float | None:
        return self.threshold

    def state_dict(self) -> dict:
        return {}  # the threshold is a hyperparameter

    def load_state_dict(self, state: dict) -> None:
        pass


class QuantileClip:
    """VGG-Flow's adaptive rule as a small stateful object.

    ``reset()`` at the start of an epoch (τ ← reset_value); ``__call__(g)`` clips with the current
    τ and records the unclipped per-sample norms (``record=False``: clip only, as the code does for
    the consistency loss's auxiliary gradients); ``step()`` after an optimizer step sets τ to the
    ``quantile`` of the recorded norms and clears them (τ is kept if nothing was recorded).
    """

    def __init__(self, quantile: float = 0.8, reset_value: float = 1.0):
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
        self.quantile, self.reset_value = quantile, reset_value
        self.threshold = reset_value
        self._norms: list[torch.Tensor] = []

    def reset(self) -> None:
        self.threshold = self.reset_value
        self._norms.clear()

    def __call__(self, g: torch.Tensor, record: bool = True) -> torch.Tensor:
        if record:
            self._norms.append(sample_norms(g).detach().double().cpu())
        return clip_by_norm(g, self.threshold)

    def step(self) -> float:
        if self._norms:
            self.threshold = torch.quantile(torch.cat(self._norms), self.quantile).item()
            self._norms.clear()
        return self.threshold

    def state_dict(self) -> dict:
        """τ and the norms recorded since the last step (tensors and floats: weights-only loadable)."""
        return {"threshold": float(self.threshold), "norms": [n.clone() for n in self._norms]}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self._norms = list(state.get("norms", []))


def make_clipper(mode: str | None, threshold: float | None = None, quantile: float = 0.8):
    """'quantile' (VGG-Flow), 'fixed' (needs threshold) or None / 'none' (identity)."""
    if mode in (None, "none"):
        return FixedClip(None)
    if mode == "fixed":
        if threshold is None:
            raise ValueError("fixed reward-gradient clipping needs a threshold")
        return FixedClip(threshold)
    if mode == "quantile":
        return QuantileClip(quantile, 1.0 if threshold is None else threshold)
    raise ValueError(f"unknown clipping mode {mode!r}; choose 'quantile', 'fixed' or 'none'")


class ClippedRewardGradient:
    """Mixin of the methods that clip their reward gradient per sample with a stateful clipper (RSM-FO's
    flow setting, VGG-Flow): the clipper's lifecycle, declared once. It is built from the hyperparameters
    ``clip``, ``clip_threshold`` and ``clip_quantile`` on first use (``clipper(hp)``), reset at every
    collection (``reset_clipper``: the VGG-Flow code resets τ at each sampling phase), stepped after
    every optimizer step (``on_optimizer_step``, called by the training loop), and saved with the
    method's state (``state_dict``), so that a resumed run continues with the same τ."""

    _clipper = None
    _clipper_state = None  # restored state, applied when the clipper is built

    def clipper(self, hp: dict):
        if self._clipper is None:
            self._clipper = make_clipper(hp["clip"], hp.get("clip_threshold"), hp["clip_quantile"])
            if self._clipper_state:
                self._clipper.load_state_dict(self._clipper_state)
        return self._clipper

    def check_hparams(self, hp: dict) -> None:
        if hp.get("clip") == "fixed" and hp.get("clip_threshold") is None:
            raise TaskError("clip 'fixed' needs clip_threshold (a number > 0)")
        super().check_hparams(hp)

    def reset_clipper(self, hp: dict) -> None:
        self.clipper(hp).reset()

    def on_optimizer_step(self) -> None:
        if self._clipper is not None:
            self._clipper.step()

    def state_dict(self) -> dict:
        return {} if self._clipper is None else {"clipper": self._clipper.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._clipper_state = state.get("clipper")
        if self._clipper is not None and self._clipper_state:
            self._clipper.load_state_dict(self._clipper_state)

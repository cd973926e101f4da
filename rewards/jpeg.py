"""JPEG compressibility / incompressibility (DDPO, Black et al. 2023, arXiv 2305.13301, §6.1).

DDPO's definition (ddpo_pytorch/rewards.py, `jpeg_compressibility` / `jpeg_incompressibility`):
the sample is encoded as JPEG at ``quality=95`` with Pillow and the reward is ∓ the file size in
kB (``buffer.tell() / 1000``): −size for compressibility, +size for incompressibility.

Black-box only (``differentiable = False``): zeroth-order methods call it, first-order methods
must not. Images are in the data convention of ``rsmbench.data.images`` ([−1, 1], (B, 3, H, W)); they
are mapped to uint8 as DDPO does (``(x + 1)/2 · 255``, clamped, rounded). Tiny images are
nearest-upsampled to at least ``min_size`` px before encoding: below ~64 px the JPEG header and
tables (~0.63 kB, a constant) dominate the size and the signal is mostly header
(machine-notes §5). Nearest upsampling by an integer factor keeps the image content unchanged.

``features(x)`` (for diversity / prior preservation) is the frozen EfficientNet-Lite0 encoder of
``rewards.aesthetic_tiny``, so all three image tasks share one feature space.
"""
from __future__ import annotations

import io
import math

import torch
from PIL import Image

from rewards import register_reward
from rewards.aesthetic_tiny import Encoder
from rsmbench.data.images import to_uint8

QUALITY = 95  # DDPO


def jpeg_kb(x: torch.Tensor, quality: int = QUALITY, min_size: int = 64) -> torch.Tensor:
    """JPEG size in kB (1 kB = 1000 bytes) of each image, after nearest upsampling to ≥ min_size."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG reward needs images (B, 1|3, H, W), got shape {tuple(x.shape)}")
    factor = max(1, math.ceil(min_size / min(x.shape[-2:])))
    if factor > 1:
        x = torch.nn.functional.interpolate(x.detach().float(), scale_factor=factor, mode="nearest")
    sizes = []
    for img in to_uint8(x):
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    differentiable = False

    def __init__(self, sign: float, name: str, title: str, quality: int = QUALITY, min_size: int = 64):
        self.sign, self.name, self.title = sign, name, title
        self.quality, self.min_size = quality, min_size
        self._encoder = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return (self.sign * jpeg_kb(x, self.quality, self.min_size)).to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = Encoder()
        return self._encoder(x)


@register_reward("compressibility")
def compressibility(**cfg) -> JpegReward:
    return JpegReward(-1.0, "compressibility", "compressibility: −JPEG size (kB, quality 95)", **cfg)


@register_reward("incompressibility")
def incompressibility(**cfg) -> JpegReward:
    return JpegReward(+1.0, "incompressibility", "incompressibility: +JPEG size (kB, quality 95)", **cfg)

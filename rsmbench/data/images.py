"""Natural-image patches from photos that ship inside installed packages (no download).

The tiny image tasks (``aesthetic``, ``compressibility``, ``incompressibility``) train and
evaluate 32×32 RGB generators on patches of eight photos, conditioned on the photo's name as the
prompt (prompt ``k`` ↔ class id ``k`` of ``PHOTOS``; id ``len(PHOTOS)`` is CFG's null prompt):

    scikit-image 0.26 (``skimage/data``, BSD-3): astronaut, chelsea, coffee, rocket,
        hubble_deep_field;  scikit-learn (``load_sample_images``, BSD-3): china, flower;
    matplotlib (``mpl-data/sample_data``): grace_hopper.

Split (fixed, spatial, no overlap): each photo's top ``TRAIN_FRAC`` = 70 % of rows is the train
region, the bottom 30 % the held-out region. Each region is resized (Pillow bicubic, antialiased)
with the same factor, taking the photo's short side to each of ``SCALES`` px, and square crops are
drawn inside the region only, so no held-out pixel is seen in training.

Conventions: a patch is a float tensor (3, H, W) in [−1, 1], x = uint8/127.5 − 1 (the inverse,
``to_uint8``, is DDPO's (x + 1)/2·255, rounded and clamped). Channel order RGB.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from rsmbench.data.sources import register_data

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "china", "flower",
          "grace_hopper")
SCALES = (96, 128, 160)  # photo short side (px) before cropping
TRAIN_FRAC = 0.7
SPLITS = ("train", "heldout")


def prompts() -> list[str]:
    """The prompt strings, index = class id."""
    return [p.replace("_", " ") for p in PHOTOS]


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, read from the package that ships it."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        from matplotlib import cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    import skimage.data
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    return getattr(skimage.data, name)()[..., :3]


@lru_cache(maxsize=None)
def _regions(name: str, split: str) -> tuple[np.ndarray, ...]:
    """The split's region of the photo at every scale (uint8 arrays ≥ 32 px on each side)."""
    img = load_photo(name)
    h = img.shape[0]
    cut = int(round(TRAIN_FRAC * h))
    region = img[:cut] if split == "train" else img[cut:]
    out = []
    for short in SCALES:
        f = short / min(img.shape[:2])
        size = (max(1, round(region.shape[1] * f)), max(1, round(region.shape[0] * f)))
        out.append(np.asarray(Image.fromarray(region).resize(size, Image.BICUBIC, reducing_gap=None)))
    return tuple(out)


def patches(split: str = "train", n_per_photo: int = 256, size: int = 32, seed: int = 0,
            flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic patches: (N, 3, size, size) in [−1, 1] and class ids (N,), N = 8·n_per_photo.

    Crops are uniform over (scale, position) inside the split's region; with ``flip`` half are
    mirrored left-right. Same arguments → same tensors (numpy Generator seeded with ``seed``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k, name in enumerate(PHOTOS):
        regions = [r for r in _regions(name, split) if min(r.shape[:2]) >= size]
        if not regions:
            raise ValueError(f"photo {name!r}: no {split} region of at least {size} px")
        for _ in range(n_per_photo):
            r = regions[rng.integers(len(regions))]
            i = rng.integers(r.shape[0] - size + 1)
            j = rng.integers(r.shape[1] - size + 1)
            crop = r[i:i + size, j:j + size]
            if flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            xs.append(crop)
            ys.append(k)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.contiguous(), torch.tensor(ys, dtype=torch.long)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [−1, 1] → (B, H, W, 3) uint8 (DDPO's (x + 1)/2·255, rounded, clamped)."""
    x = ((x.detach().float().cpu() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(x: torch.Tensor, path: str, nrow: int = 8, scale: int = 2) -> None:
    """Write a PNG grid of images in [−1, 1] (nearest upscaled by ``scale``), for inspection."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    ncol = min(nrow, b)
    rows = (b + ncol - 1) // ncol
    grid = np.full((rows * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, np.uint8)
    for n, im in enumerate(imgs):
        r, q = divmod(n, ncol)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


@register_data("photo_patches")
class PatchData:
    """Pretraining data source ``photo_patches``: a fixed patch set, drawn with replacement.

    ``sample(n, generator) -> (x0 (n, 3, size, size) in [−1, 1], class ids (n,))``.
    """

    def __init__(self, split: str = "train", n_per_photo: int = 256, size: int = 32, seed: int = 0):
        self.x, self.cond = patches(split, n_per_photo=n_per_photo, size=size, seed=seed)

    def sample(self, n: int, generator: torch.Generator):
        idx = torch.randint(len(self.x), (n,), generator=generator)
        return self.x[idx], self.cond[idx]

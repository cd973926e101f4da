"""LAION aesthetic predictor v2 (full scale): the DDPO / AlignProp aesthetic reward.

DDPO (Black et al. 2023, arXiv 2305.13301, §6.1; ddpo_pytorch/aesthetic_scorer.py) and AlignProp
(Prabhudesai et al. 2023, arXiv 2310.03739) score an image with the MLP of
christophschuhmann/improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``) applied to the
L2-normalised CLIP ViT-L/14 image embedding (768-d, ``get_image_features``).

Differentiable end to end (no ``no_grad``, unlike DDPO's scorer: anchors §2 item 26): the CLIP
preprocessing is done in torch, as AlignProp does — [−1, 1] → [0, 1], bicubic resize of the short
side to 224 (antialiased), centre crop 224, normalise with CLIP's mean/std — instead of the PIL
``CLIPProcessor``. Weights: ``clip`` (a local transformers directory or a hub id found in the HF
cache; default ``openai/clip-vit-large-patch14``) and ``head`` (the .pth state dict, read with
``torch.load(weights_only=True)``, or a .safetensors file; default ``$RSMBENCH_AESTHETIC_HEAD`` or
``~/.cache/rsmbench/sac+logos+ava1-l14-linearMSE.pth``). A missing one raises ``MissingWeights``
(one line, exit code 2) naming it and how to provide it. Nothing is downloaded.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from rewards import register_reward
from rewards.aesthetic_tiny import LaionHead
from rsmbench.errors import MissingWeights

CLIP_ID = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBED_DIM = 768  # ViT-L/14 projection


def default_head_path() -> str:
    return os.environ.get("RSMBENCH_AESTHETIC_HEAD",
                          os.path.join(os.path.expanduser("~"), ".cache", "rsmbench", HEAD_FILE))


def clip_preprocess(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Differentiable CLIP preprocessing of images in [−1, 1], (B, 3, H, W)."""
    x = (x + 1) / 2
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def hub_dir(repo: str, what: str, key: str) -> str:
    """A local directory, or a hub id's snapshot in the HF cache (never downloaded); else MissingWeights
    naming the override ``reward.<key>``."""
    if os.path.isdir(repo):
        return repo
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:
        raise MissingWeights(f"{what}: {repo!r} not found locally; run `huggingface-cli download {repo}` "
                             f"or pass reward.{key}=/path/to/dir") from None


def resolve_clip(clip: str) -> str:
    return hub_dir(clip, "aesthetic reward: CLIP model", "clip")


def check_weights(clip: str = CLIP_ID, head: str | None = None, **_) -> tuple[str, str]:
    """(clip dir, head path), or ``MissingWeights`` naming the first missing one."""
    head = head or default_head_path()
    if not os.path.isfile(head):
        raise MissingWeights(f"aesthetic reward: head weights {head} not found; download {HEAD_URL} "
                             f"and pass reward.head=<path> (or set RSMBENCH_AESTHETIC_HEAD)")
    return resolve_clip(clip), head


def load_head_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class LaionAesthetic(nn.Module):
    """reward(x) = MLP(normalise(CLIP-L/14 image embedding)), x in [−1, 1] → (B,); differentiable."""

    name = "aesthetic"
    title = "LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP)"
    differentiable = True

    def __init__(self, vision: nn.Module, head: LaionHead):
        super().__init__()
        self.vision, self.head = vision.eval().requires_grad_(False), head.eval().requires_grad_(False)
        self.image_size = vision.config.image_size

    @classmethod
    def from_pretrained(cls, clip: str = CLIP_ID, head: str | None = None, dtype=torch.float32, **_):
        from transformers import CLIPVisionModelWithProjection

        clip_dir, head_path = check_weights(clip, head)
        vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir, torch_dtype=dtype, local_files_only=True)
        mlp = LaionHead(EMBED_DIM)
        mlp.load_state_dict(load_head_state(head_path))
        return cls(vision, mlp)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (B, 768), before normalisation."""
        p = next(self.vision.parameters())
        return self.vision(pixel_values=clip_preprocess(x, self.image_size).to(p.dtype)).image_embeds

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        # LaionHead L2-normalises its input (DDPO: embed / ‖embed‖) before the MLP
        return self.head(self.features(x).float()).to(x.dtype)


@register_reward("aesthetic")
def aesthetic(**cfg) -> LaionAesthetic:
    return LaionAesthetic.from_pretrained(**cfg)


aesthetic.check_weights = check_weights

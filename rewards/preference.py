"""Preference rewards at full scale: PickScore, HPS v2.1, ImageReward.

Each loads its weights when they are present locally and otherwise raises ``MissingWeights``
(one line, exit code 2) naming exactly what is missing and how to provide it. Images are in the
project convention ([−1, 1], (B, 3, H, W)); ``cond`` ids index ``self.prompts`` (set by
``rsmbench.run.fullscale.LatentReward`` from the task's prompt list). All three are differentiable
(torch CLIP preprocessing, ``rewards.laion_aesthetic.clip_preprocess``), so first-order methods can
use them; RSM's first-order SD experiments use HPS v2.1 (derivations §9.1, §9.2).

- PickScore (Kirstain et al. 2023, arXiv 2305.01569): a CLIP-H/14 fine-tuned on Pick-a-Pic;
  score = exp(logit_scale)·⟨ê_img, ê_txt⟩ (the model card's inference code). transformers only:
  model ``yuvalkirstain/PickScore_v1``, tokenizer from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
- HPS v2.1 (Wu et al. 2023, arXiv 2306.09341): OpenCLIP ViT-H-14 with the ``HPS_v2.1_compressed.pt``
  checkpoint (hub ``xswu/HPSv2``); score = ⟨ê_img, ê_txt⟩ (``hpsv2.score``). Needs the
  ``open_clip_torch`` package, which is not installable on the build machines (it pulls torchvision).
- ImageReward (Xu et al. 2023, arXiv 2304.05977): BLIP + MLP, package ``image-reward``, checkpoint
  ``ImageReward.pt`` (hub ``THUDM/ImageReward``); differentiable ``score_gard`` as in its repo.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from rewards import register_reward
from rewards.laion_aesthetic import clip_preprocess, hub_dir
from rsmbench.errors import MissingWeights


def _hub_file(path_or_repo: str, filename: str, what: str, key: str, env: str) -> str:
    path = os.environ.get(env, path_or_repo)
    if os.path.isfile(path):
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path, filename, local_files_only=True)
    except Exception:
        raise MissingWeights(f"{what}: {filename} not found (looked for {path!r} and the HF cache); run "
                             f"`huggingface-cli download {path_or_repo} {filename}` or pass reward.{key}=<file> "
                             f"(or set {env})") from None


def _need_package(module: str, pip_name: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingWeights(f"{what}: the Python package {pip_name!r} is not installed (module {module!r}); "
                             f"pip install {pip_name}")


class _PromptReward(nn.Module):
    differentiable = True

    def __init__(self, prompts=None):
        super().__init__()
        self.prompts = list(prompts or [])

    def texts(self, cond, n: int) -> list[str]:
        if cond is None or not self.prompts:
            raise ValueError(f"{self.name} needs prompts: pass prompts=[...] (set by fullscale.LatentReward) "
                             "and cond ids")
        return [self.prompts[int(c)] for c in cond]


# ---- PickScore (transformers) ------------------------------------------------------------------------
PICKSCORE_MODEL, PICKSCORE_PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(_PromptReward):
    name, title = "pickscore", "PickScore (CLIP-H/14, Pick-a-Pic)"

    def __init__(self, model: nn.Module, tokenizer, prompts=None):
        super().__init__(prompts)
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer

    @classmethod
    def from_pretrained(cls, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, prompts=None, **_):
        from transformers import CLIPModel, CLIPTokenizer

        mdir = hub_dir(model, "pickscore reward", "model")
        pdir = hub_dir(processor, "pickscore reward (tokenizer)", "processor")
        return cls(CLIPModel.from_pretrained(mdir, local_files_only=True),
                   CLIPTokenizer.from_pretrained(pdir, local_files_only=True), prompts)

    def forward(self, x, cond=None):
        dev = x.device
        tok = self.tokenizer(self.texts(cond, len(x)), padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt").to(dev)
        p = next(self.model.parameters())
        pixels = clip_preprocess(x, self.model.config.vision_config.image_size).to(p.dtype)
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(**tok)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (self.model.logit_scale.exp() * (img * txt).sum(-1)).to(x.dtype)


@register_reward("pickscore")
def pickscore(**cfg) -> PickScore:
    return PickScore.from_pretrained(**cfg)


pickscore.check_weights = lambda model=PICKSCORE_MODEL, processor=PICKSCORE_PROCESSOR, **_: (
    hub_dir(model, "pickscore reward", "model"), hub_dir(processor, "pickscore reward (tokenizer)", "processor"))


# ---- HPS v2.1 (open_clip) ---------------------------------------------------------------------------------
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"


def hps_check(checkpoint: str = HPS_REPO, **_) -> str:
    _need_package("open_clip", "open_clip_torch", "hpsv2 reward")
    return _hub_file(checkpoint, HPS_FILE, "hpsv2 reward", "checkpoint", "RSMBENCH_HPS_CKPT")


class HPSv21(_PromptReward):
    name, title = "hpsv2", "HPS v2.1 (OpenCLIP ViT-H-14)"

    def __init__(self, checkpoint: str = HPS_REPO, prompts=None, **_):
        super().__init__(prompts)
        path = hps_check(checkpoint)
        import open_clip

        self.model = open_clip.create_model("ViT-H-14", pretrained=None).eval().requires_grad_(False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state))
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")

    def forward(self, x, cond=None):
        img = self.model.encode_image(clip_preprocess(x), normalize=True)
        txt = self.model.encode_text(self.tokenizer(self.texts(cond, len(x))).to(x.device), normalize=True)
        return (img * txt).sum(-1).to(x.dtype)


@register_reward("hpsv2")
def hpsv2(**cfg) -> HPSv21:
    return HPSv21(**cfg)


hpsv2.check_weights = hps_check


# ---- ImageReward (image-reward package) ----------------------------------------------------------------------
IR_REPO, IR_FILE = "THUDM/ImageReward", "ImageReward.pt"


def imagereward_check(checkpoint: str = IR_REPO, **_) -> str:
    _need_package("ImageReward", "image-reward", "imagereward reward")
    return _hub_file(checkpoint, IR_FILE, "imagereward reward", "checkpoint", "RSMBENCH_IMAGEREWARD_CKPT")


class ImageRewardScore(_PromptReward):
    name, title = "imagereward", "ImageReward (BLIP + MLP)"

    def __init__(self, checkpoint: str = IR_REPO, prompts=None, **_):
        super().__init__(prompts)
        path = imagereward_check(checkpoint)
        import ImageReward as RM

        self.model = RM.load(path, device="cpu").eval().requires_grad_(False)

    def forward(self, x, cond=None):
        tok = self.model.blip.tokenizer(self.texts(cond, len(x)), padding="max_length", truncation=True,
                                        max_length=35, return_tensors="pt").to(x.device)
        img = clip_preprocess(x)  # BLIP uses the same mean/std and 224 px
        return self.model.score_gard(tok.input_ids, tok.attention_mask, img).reshape(-1).to(x.dtype)


@register_reward("imagereward")
def imagereward(**cfg) -> ImageRewardScore:
    return ImageRewardScore(**cfg)


imagereward.check_weights = imagereward_check

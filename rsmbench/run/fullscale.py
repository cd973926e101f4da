"""The full-scale path: Stable Diffusion 1.5 (diffusion) and 3.5 (flow) behind the core's net interface.

Every method and rollout calls a network as ``net(x, t, cond)`` with an integer prompt id per sample
(id ``net.num_classes`` = the null prompt of classifier-free guidance; ``rsmbench.core.models.Policy``).
This module makes SD look exactly like that, so every method runs unchanged on it:

- ``LatentNet``: ``UNet2DConditionModel`` (SD1.5, ε) or ``SD3Transformer2DModel`` (SD3.5, v) on latents,
  with the text embeddings of the task's prompts precomputed once and looked up by id (the null id is
  the empty prompt, as in diffusers' pipelines and DDPO: ``negative_prompt_embeds`` of "").
- LoRA through peft (``add_adapter``); the reference model is the same network with the adapter
  disabled (``ReferenceNet``), the behaviour policy θ† a snapshot of the adapter weights swapped in
  for its forward (``BehaviourNet``; no second copy of the base model).
- ``LatentReward``: VAE decode (differentiable, no ``no_grad`` on the path of a differentiable reward)
  followed by a pixel reward on images in the project's data convention ([−1, 1], (B, 3, H, W);
  ``rsmbench.data.images``), so the tiny rewards (JPEG) and the full-scale ones take the same input.
- Mixed precision: the frozen base weights are stored in bf16/fp16, the LoRA weights in fp32, the
  network runs under autocast and its output is cast back to fp32, and every process quantity
  (means, log-probs, KL) is computed in fp32 from that output. Rollout and training call the same
  function on the same stored states, so their log-probs agree up to kernel nondeterminism; the
  Flow-GRPO FAQ recommends fp16 over bf16 for that reason (anchors.md §1b), hence ``precision='fp16'``
  is the default of the zeroth-order (likelihood-ratio) methods.

Profiles (derivations §2.2, §2.3, §9; anchors §3a): ``sd15`` = SD1.5, 50-step DDIM with η = 1 (DDPM
posterior), CFG 5.0 (DDPO / AlignProp); ``sd35`` = SD3.5-Medium, shifted (shift 3) Flow-GRPO SDE grid
with 10 steps (zeroth-order) / 20 (first-order) / 40 (evaluation), noise level a = 0.7, CFG 4.5
(zeroth-order) / 5.0 (first-order). Nothing is downloaded unless ``allow_download=True``.
"""
from __future__ import annotations

import contextlib
import gzip
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

import rewards
from rsmbench.core.method import Context
from rsmbench.core.models import Policy
from rsmbench.core.process import make_process
from rsmbench.errors import MissingWeights

ASSETS = resources.files("rsmbench") / "assets"
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "tasks" / "prompts"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


# ---- profiles ----------------------------------------------------------------------------------
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")  # Flow-GRPO config/grpo.py
SD15_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # DDPO / AlignProp / RSM sd15 (derivations §9.1)


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str  # 'diffusion' | 'flow'
    model: str  # default hub id (resolved from the local cache only, unless downloads are allowed)
    pipeline: str  # diffusers pipeline class
    process: dict  # rsmbench.core.process.make_process kwargs
    cfg_scale: dict  # per method order
    num_steps: dict  # per method order (and 'eval')
    lora: dict  # per method order: r, alpha, targets, source
    resolution: int = 512
    source: str = ""


PROFILES = {
    "sd15": Profile(
        name="sd15", kind="diffusion", model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline="StableDiffusionPipeline", process=dict(eta=1.0),
        cfg_scale={"zeroth": 5.0, "first": 5.0}, num_steps={"zeroth": 50, "first": 50, "eval": 50},
        lora={"zeroth": dict(r=16, alpha=16, targets=SD15_LORA_TARGETS,
                             source="RSM sd15 zeroth-order, derivations §9.3"),
              "first": dict(r=8, alpha=8, targets=SD15_LORA_TARGETS, source="RSM sd15 first-order, derivations §9.1")},
        source="DDPO (arXiv 2305.13301) / AlignProp (arXiv 2310.03739): 50 DDIM steps, eta 1, CFG 5.0, 512 px"),
    "sd35": Profile(
        name="sd35", kind="flow", model="stabilityai/stable-diffusion-3.5-medium",
        pipeline="StableDiffusion3Pipeline", process=dict(noise_level=0.7),
        cfg_scale={"zeroth": 4.5, "first": 5.0}, num_steps={"zeroth": 10, "first": 20, "eval": 40},
        lora={"zeroth": dict(r=32, alpha=64, targets=SD3_LORA_TARGETS, source="Flow-GRPO / RSM sd35, derivations §9.4"),
              "first": dict(r=8, alpha=8, targets=SD3_LORA_TARGETS, source="VGG-Flow / RSM sd35, derivations §9.2")},
        source="Flow-GRPO (arXiv 2505.05470): shift-3 grid, 10/20/40 steps, a = 0.7, CFG 4.5 / 5.0, 512 px"),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown full-scale profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


# ---- prompts and the real CLIP tokenizer ---------------------------------------------------------
def load_prompts(name_or_path: str) -> list[str]:
    """A prompt list: a name in tasks/prompts (``simple_animals``: DDPO's 45 animals; ``imagenet_animals``:
    ImageNet-1k classes 0–397, DDPO's compressibility prompts) or a text file, one prompt per line."""
    p = Path(name_or_path)
    if not p.exists():
        p = PROMPTS_DIR / f"{name_or_path}.txt"
    if not p.exists():
        raise FileNotFoundError(f"prompt list {name_or_path!r} not found "
                                f"(neither a file nor tasks/prompts/{name_or_path}.txt)")
    return [s.strip() for s in p.read_text().splitlines() if s.strip()]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte ↔ unicode table (Radford et al. 2019; open_clip tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_bpe():
    text = gzip.decompress((ASSETS / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8")
    merges = [tuple(m.split()) for m in text.split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """The real CLIP BPE tokenizer (49 408 tokens, ids identical to OpenAI's), built offline from the
    vendored ``bpe_simple_vocab_16e6.txt.gz`` of open_clip (MIT; machine-notes §2)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         pad_token="<|endoftext|>")


# ---- weights: resolve locally or name exactly what is missing ------------------------------------------
def resolve_model(model: str, allow_download: bool = False) -> str:
    """A local diffusers directory for `model` (a path or a hub id found in the HF cache).
    Raises ``MissingWeights`` with the fix when it is not there."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise MissingWeights(f"{model} is not a diffusers model directory (no model_index.json); "
                                 f"pass model=<dir saved with save_pretrained> or a hub id in the cache")
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=not allow_download)
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, OfflineModeIsEnabled, ...
        raise MissingWeights(
            f"base model {model!r} is not in the Hugging Face cache ({type(e).__name__}); run "
            f"`huggingface-cli download {model}` on a machine with access (accept its licence first), "
            f"or pass model=/path/to/diffusers/dir") from None


def check_weights(profile: str, model: str | None = None, reward: str | None = None,
                  reward_cfg: dict | None = None, allow_download: bool = False) -> str:
    """Check that the base model (and the reward's weights) exist; return the model directory.
    Raises ``MissingWeights`` (one line, exit code 2 at the command line)."""
    prof = get_profile(profile)
    path = resolve_model(model or prof.model, allow_download)
    if reward is not None:
        rewards.load_all()
        factory = rewards.REWARDS.get(reward)
        checker = getattr(factory, "check_weights", None)
        if checker is not None:
            checker(**(reward_cfg or {}))
    return path


def load_pipeline(profile: str, model: str | None = None, dtype=torch.float32, allow_download: bool = False):
    """The diffusers pipeline of a profile from a local directory or the cache (no safety checker)."""
    import diffusers

    prof = get_profile(profile)
    path = resolve_model(model or prof.model, allow_download)
    cls = getattr(diffusers, prof.pipeline)
    kw = dict(safety_checker=None, requires_safety_checker=False) if prof.kind == "diffusion" else {}
    return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=not allow_download, **kw)


# ---- random-init pipelines of the right shapes (tests, GPU check) -------------------------------
def random_pipeline(kind: str, size: str = "tiny", seed: int = 0, device=None):
    """An SD1.5-shaped (kind='diffusion') or SD3-shaped (kind='flow') pipeline built from config with
    random weights and the real CLIP tokenizer. size='tiny': a few k–M parameters (CPU tests);
    size='full': the published backbone and VAE configs (SD1.5 UNet 860 M; SD3.5-Medium MMDiT 2.5 B),
    with small text encoders of the right output widths and no T5 (its slot is zeros, as in diffusers)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if device is not None:  # initialise directly on `device` (a 2.5 B MMDiT initialises in seconds on a GPU)
        with torch.device(device):
            return random_pipeline(kind, size, seed)
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    full = size == "full"

    def text_cfg(width, proj=None):
        return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                              max_position_embeddings=77, num_hidden_layers=1 if full else 2,
                              num_attention_heads=max(1, width // 64) if full else 4,
                              projection_dim=proj or width,
                              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

    if kind == "diffusion":
        if full:
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.x config defaults
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                sample_size=512, scaling_factor=0.18215)
            te = CLIPTextModel(text_cfg(768))
        else:
            unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
            vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                scaling_factor=0.18215)
            te = CLIPTextModel(text_cfg(16))
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "flow":
        if full:  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
            tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                       caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                       pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                       qk_norm="rms_norm")
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                                shift_factor=0.0609)
            te1, te2 = CLIPTextModelWithProjection(text_cfg(768)), CLIPTextModelWithProjection(text_cfg(1280))
        else:  # joint dim = CLIP widths 16 + 16 (T5 slot zero-padded to it), pooled = 16 + 16
            tr = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4,
                                       num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8,
                                       pooled_projection_dim=32, out_channels=4, pos_embed_max_size=4)
            vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                                shift_factor=0.0609)
            te1, te2 = CLIPTextModelWithProjection(text_cfg(16)), CLIPTextModelWithProjection(text_cfg(16))
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=te1, tokenizer=tok,
                                        text_encoder_2=te2, tokenizer_2=clip_tokenizer(), text_encoder_3=None,
                                        tokenizer_3=None)
    raise ValueError(f"unknown kind {kind!r}; choose 'diffusion' or 'flow'")


# ---- prompt embeddings -----------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, chunk: int = 16):
    """(embeds (P+1, L, D), pooled (P+1, F) or None): the prompts' text embeddings, then the empty
    prompt's (the CFG null prompt), computed with the pipeline's own ``encode_prompt``."""
    embs, pools, null = [], [], None
    for k in range(0, len(prompts), chunk):
        part = prompts[k:k + chunk]
        if hasattr(pipe, "transformer"):  # SD3: CLIP-L + CLIP-G (+ T5), pooled CLIP projections
            e, ne, p, npool = pipe.encode_prompt(prompt=part, prompt_2=None, prompt_3=None, device=device,
                                                 do_classifier_free_guidance=True, negative_prompt=[""] * len(part))
            pools.append(p)
            null = (ne[:1], npool[:1])
        else:
            e, ne = pipe.encode_prompt(part, device, 1, True, negative_prompt=[""] * len(part))
            null = (ne[:1], None)
        embs.append(e)
    embeds = torch.cat(embs + [null[0]])
    pooled = torch.cat(pools + [null[1]]) if pools else None
    return embeds, pooled


# ---- the net wrapper, the reference and the behaviour views ---------------------------------------------
class LatentNet(nn.Module):
    """``net(x, t, cond)`` over SD latents: the backbone with text embeddings looked up by prompt id.

    The backbone is called through ``self.runner`` (the backbone itself, or its DDP wrapper set by
    ``rsmbench.run.distributed``). Under ``autocast_dtype`` the backbone runs in mixed precision and the
    output is returned in the input's dtype (fp32), so every process quantity stays fp32.
    """

    def __init__(self, backbone: nn.Module, kind: str, embeds: torch.Tensor, pooled: torch.Tensor | None = None,
                 autocast_dtype=None, state_dtype=torch.float32):
        super().__init__()
        # first in parameters(): the dtype the core reads for states and process math (method._dtype)
        self.state_dtype = nn.Parameter(torch.empty(0, dtype=state_dtype), requires_grad=False)
        self.backbone, self.kind = backbone, kind
        self.prediction = "epsilon" if kind == "diffusion" else "v"
        self.num_classes = embeds.shape[0] - 1  # the last row is the null (empty) prompt
        self.register_buffer("embeds", embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        self.autocast_dtype = autocast_dtype
        object.__setattr__(self, "runner", backbone)  # not a submodule: parameters stay the backbone's

    def forward(self, x, t, cond=None, raw: bool = False):
        """raw: call the bare backbone, not its DDP wrapper (the reference / behaviour views)."""
        run = self.backbone if raw else self.runner
        B, dev = x.shape[0], self.embeds.device  # states may live on the CPU, the backbone on a GPU
        cond = torch.full((B,), self.num_classes, dtype=torch.long, device=dev) if cond is None else cond.to(dev)
        t = torch.as_tensor(t).to(dev).reshape(-1).expand(B)
        emb, x_in = self.embeds[cond], x.to(dev)
        ac = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else contextlib.nullcontext())
        with ac:
            if self.kind == "diffusion":
                out = run(x_in, t, encoder_hidden_states=emb).sample
            else:
                out = run(hidden_states=x_in, timestep=t, encoder_hidden_states=emb,
                          pooled_projections=self.pooled[cond]).sample
        return out.to(device=x.device, dtype=x.dtype)

    def lora_parameters(self):
        return [p for p in self.backbone.parameters() if p.requires_grad]


class ReferenceNet(nn.Module):
    """The reference model: the same network with its LoRA adapter disabled (frozen weights)."""

    def __init__(self, net: LatentNet):
        super().__init__()
        object.__setattr__(self, "net", net)
        self.num_classes, self.prediction = net.num_classes, net.prediction

    def parameters(self, recurse: bool = True):
        return self.net.parameters(recurse)

    def forward(self, x, t, cond=None):  # grad w.r.t. x is allowed (adjoints); the base weights are frozen
        bb = self.net.backbone
        bb.disable_adapters()
        try:
            return self.net(x, t, cond, raw=True)
        finally:
            bb.enable_adapters()


class BehaviourNet(nn.Module):
    """θ†: a snapshot of the trainable (LoRA) weights, swapped in for the forward pass, frozen
    (no parameter receives a gradient; grad w.r.t. x is allowed, for adjoints). ``sync()`` takes a
    new snapshot (call it at every collection, as ``frozen_copy`` would)."""

    def __init__(self, net: LatentNet):
        super().__init__()
        object.__setattr__(self, "net", net)
        self.num_classes, self.prediction = net.num_classes, net.prediction
        self.sync()

    def parameters(self, recurse: bool = True):
        return self.net.parameters(recurse)

    @torch.no_grad()
    def sync(self):
        object.__setattr__(self, "snapshot", [p.detach().clone() for p in self.net.lora_parameters()])

    def forward(self, x, t, cond=None):
        params = self.net.lora_parameters()
        live = [p.data for p in params]
        try:
            for p, s in zip(params, self.snapshot):
                p.data = s  # pointer swap: tensors saved by a live autograd graph are untouched
                p.requires_grad_(False)
            return self.net(x, t, cond, raw=True)
        finally:
            for p, d in zip(params, live):
                p.data = d
                p.requires_grad_(True)


def add_lora(backbone: nn.Module, r: int, alpha: float, targets, seed: int = 0):
    """Attach a peft LoRA adapter (Hu et al. 2021, arXiv 2106.09685) and freeze everything else.
    LoRA weights are kept in fp32 (diffusers' ``cast_training_params``) whatever the base dtype."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    backbone.requires_grad_(False)
    torch.manual_seed(seed)
    backbone.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    base = next(p for p in backbone.parameters()).dtype
    cast_training_params(backbone, dtype=torch.float64 if base == torch.float64 else torch.float32)
    return backbone


# ---- the reward on latents ---------------------------------------------------------------------------------
class LatentReward:
    """reward(z, cond) = pixel_reward(decode(z), cond), images in [−1, 1] (B, 3, H, W).

    decode: x = VAE(z / scaling + shift), clamped to [−1, 1] (DDPO / AlignProp clamp (x/2 + 1/2) to
    [0, 1]: the same thing in the [−1, 1] convention).
    A differentiable pixel reward gets a differentiable decode; a black-box one is decoded without grad.
    """

    def __init__(self, vae, pixel_reward, prompts=None):
        self.vae, self.pixel = vae, pixel_reward
        self.name = getattr(pixel_reward, "name", "reward")
        self.title = getattr(pixel_reward, "title", self.name)
        self.differentiable = bool(getattr(pixel_reward, "differentiable", True))
        if prompts is not None and hasattr(pixel_reward, "prompts"):
            pixel_reward.prompts = list(prompts)

    def decode(self, z):
        cfg = self.vae.config
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        x = self.vae.decode(z.to(device=self.vae.device, dtype=self.vae.dtype)).sample
        return x.to(z.dtype).clamp(-1, 1)

    def __call__(self, z, cond=None):  # rewards come back on the device of the states
        if self.differentiable:
            return self.pixel(self.decode(z), cond).to(z.device)
        with torch.no_grad():
            return self.pixel(self.decode(z), cond).to(z.device)

    def features(self, z):
        with torch.no_grad():
            return self.pixel.features(self.decode(z)).to(z.device)


# ---- the context for the bench ------------------------------------------------------------------------------
@dataclass
class FullScale:
    ctx: Context
    pipe: object
    net: LatentNet
    prompts: list
    profile: Profile
    extra: dict = field(default_factory=dict)

    def sync_behaviour(self):
        """θ† ← θ before each collection (the behaviour policy is a LoRA snapshot)."""
        self.ctx.behaviour.net.sync()


def build(method, profile: str, pixel_reward, prompts="simple_animals", model: str | None = None, pipe=None,
          hp: dict | None = None, precision: str = "bf16", device=None, dtype=torch.float32,
          gradient_checkpointing: bool = True, lora: dict | None = None, num_steps: int | None = None,
          cfg_scale: float | None = None, resolution: int | None = None, seed: int = 0,
          allow_download: bool = False) -> FullScale:
    """The full-scale ``Context`` for `method` (a ``rsmbench.core.method.Method``) on a profile.

    `pixel_reward` is a reward object on images in [−1, 1]; `pipe` a ready pipeline (tests pass a
    ``random_pipeline``), else the profile's model is loaded from `model` / the cache. LoRA rank,
    alpha and targets come from `lora`, else from the method's hyperparameters (``lora_r``,
    ``lora_alpha``, ``lora_targets``), else from the profile default for the method's order.
    `precision` sets the stored dtype of the frozen base weights (LoRA stays fp32); `dtype` is the
    dtype of states and process math (fp32; fp64 in the equivalence tests).
    """
    prof = get_profile(profile)
    hp = method.hparams(**(hp or {}))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wdtype = PRECISIONS[precision]
    if pipe is None:
        pipe = load_pipeline(profile, model, dtype=wdtype, allow_download=allow_download)
    elif pipe.dtype != wdtype:
        pipe.to(dtype=wdtype)
    pipe.to(device)
    prompt_list = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    embeds, pooled = encode_prompts(pipe, prompt_list, device)
    backbone = pipe.unet if prof.kind == "diffusion" else pipe.transformer
    lo = dict(prof.lora[method.order])
    lo.update({k[5:]: hp[k] for k in ("lora_r", "lora_alpha", "lora_targets") if k in hp})
    lo.update(lora or {})
    add_lora(backbone, lo["r"], lo["alpha"], lo["targets"], seed=seed)
    if gradient_checkpointing and device.type == "cuda":
        backbone.enable_gradient_checkpointing()
    for m in (pipe.vae, *(getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))):
        if m is not None:
            m.requires_grad_(False)
    pipe.vae.to(dtype=dtype if wdtype in (torch.float32, torch.float64) else torch.float32)  # fp32 VAE decode
    autocast = None if wdtype in (torch.float32, torch.float64) else wdtype
    net = LatentNet(backbone, prof.kind, embeds.to(dtype), None if pooled is None else pooled.to(dtype), autocast,
                    state_dtype=dtype).to(device)
    n = num_steps or prof.num_steps[method.order]
    process = make_process(prof.kind, num_steps=n, **_process_kw(prof, pipe))
    w = cfg_scale if cfg_scale is not None else prof.cfg_scale[method.order]
    res = resolution or prof.resolution
    latent = res // pipe.vae_scale_factor
    shape = (backbone.config.in_channels, latent, latent)
    if isinstance(pixel_reward, nn.Module):  # e.g. the LAION head on CLIP: next to the VAE
        pixel_reward.to(device)
    ctx = Context(process=process, policy=Policy(net, process, w), ref=Policy(ReferenceNet(net), process, w),
                  behaviour=Policy(BehaviourNet(net), process, w),
                  reward=LatentReward(pipe.vae, pixel_reward, prompt_list), hp=hp, shape=shape)
    return FullScale(ctx=ctx, pipe=pipe, net=net, prompts=prompt_list, profile=prof, extra={"lora": lo})


def make_profile_process(prof: Profile, pipe, num_steps: int):
    """The profile's process on the pipeline's own scheduler constants, with `num_steps` steps
    (the bench's evaluation uses ``prof.num_steps['eval']``)."""
    return make_process(prof.kind, num_steps=int(num_steps), **_process_kw(prof, pipe))


def trainable_state(net: LatentNet) -> dict:
    """The trainable (LoRA) parameters by name: what a full-scale checkpoint holds (never the base)."""
    return {n: p.detach().contiguous() for n, p in net.backbone.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(net: LatentNet, state: dict) -> None:
    params = {n: p for n, p in net.backbone.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(f"checkpoint holds {len(state)} tensors, the adapter {len(params)}: not this run's LoRA")
    for n, p in params.items():
        p.copy_(state[n].to(p.device, p.dtype))


def _process_kw(prof: Profile, pipe) -> dict:
    kw = dict(prof.process)
    cfg = pipe.scheduler.config
    if prof.kind == "diffusion":
        kw["scheduler"] = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    else:
        kw["shift"] = cfg.get("shift", 3.0)
    return kw


def main(argv=None) -> int:
    """``python -m rsmbench.run.fullscale --profile sd15 [--model DIR|ID] [--reward NAME]``: check that the
    weights a full-scale run needs are present. Prints the model directory, or one line naming what
    is missing and how to provide it, with exit code 2."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="check the weights of a full-scale profile")
    ap.add_argument("--profile", required=True, choices=sorted(PROFILES))
    ap.add_argument("--model", default=None)
    ap.add_argument("--reward", default=None)
    args = ap.parse_args(argv)
    try:
        print(check_weights(args.profile, args.model, args.reward))
    except MissingWeights as e:
        print(f"error: {e}", file=sys.stderr)
        return MissingWeights.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

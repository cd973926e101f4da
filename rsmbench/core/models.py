"""Tiny networks built from config, the frozen reference copy, and the CFG policy wrapper.

Three families, each usable as ε-predictor (diffusion) or v-predictor (flow); the prediction type
is a tag checked against the process, the architecture is the same:
- ``mlp``: a time-conditioned MLP for low-dimensional data (the 2-D toy tasks);
- ``unet``: a diffusers ``UNet2DModel`` for images, class-conditioned on a prompt index;
- ``text_unet``: Stable Diffusion's structure at toy size, a diffusers ``UNet2DConditionModel``
  cross-attending to a transformers ``CLIPTextModel`` over a word-level tokenizer of its prompts.

Prompt conditioning is an integer id per sample; id ``num_classes`` is the null prompt used by
classifier-free guidance (the unconditional branch; for ``text_unet`` the empty text).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from rsmbench.core.process import PREDICTION


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of the model time input (diffusers' / DDPM's convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeMLP(nn.Module):
    """x ∈ R^dim, time t (model units), optional class id → native output in R^dim."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, temb: int = 32,
                 num_classes: int = 0):
        super().__init__()
        self.dim, self.temb, self.num_classes = dim, temb, num_classes
        self.cond = nn.Embedding(num_classes + 1, temb) if num_classes else None
        layers, width = [], dim + temb
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t, cond=None):
        h = timestep_embedding(t.to(x.dtype).expand(x.shape[0]), self.temb)
        if self.cond is not None and cond is not None:
            h = h + self.cond(cond)
        return self.net(torch.cat([x, h], dim=-1))


class TinyUNet(nn.Module):
    """diffusers UNet2DModel with an optional class (prompt) embedding. `attention_levels`: how many of the
    coarsest levels have self-attention (default: all but the finest); `mid_attention`: self-attention in
    the middle block. On CPU the attention at 16×16 costs more than the convolutions: the photo-patch
    generators keep it in the 8×8 middle block only (3× faster forward, tasks/_photo_patches.yaml)."""

    def __init__(self, sample_size: int = 16, channels: int = 3, block_out_channels=(32, 64),
                 layers_per_block: int = 1, norm_num_groups: int = 8, num_classes: int = 0,
                 attention_levels: int | None = None, mid_attention: bool = True):
        super().__init__()
        self.num_classes = num_classes
        levels = len(block_out_channels)
        attn = levels - 1 if attention_levels is None else attention_levels
        if not 0 <= attn < levels:
            raise ValueError(f"attention_levels must be in [0, {levels - 1}] for {levels} levels, got {attn}")
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels,
            layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D",) * (levels - attn) + ("AttnDownBlock2D",) * attn,
            up_block_types=("AttnUpBlock2D",) * attn + ("UpBlock2D",) * (levels - attn),
            norm_num_groups=norm_num_groups, add_attention=mid_attention,
            num_class_embeds=(num_classes + 1) if num_classes else None,
        )

    def forward(self, x, t, cond=None):
        t = t.to(x.dtype).expand(x.shape[0])
        labels = cond if self.num_classes else None
        return self.unet(x, t, class_labels=labels).sample


class TextUNet(nn.Module):
    """Text-conditioned UNet: ``UNet2DConditionModel`` with cross-attention on ``CLIPTextModel``.

    The net holds its prompt table: ``prompts[k]`` is the text of prompt id k and id
    ``num_classes = len(prompts)`` is the empty text (CFG's null prompt), so it is called like the
    other archs, ``net(x, t, cond)`` with integer ids. Tokens: one per word (vocabulary: the
    sorted words of the prompts after <pad>, <bos>, <eos>), ``<bos> words <eos>`` right-padded to
    the longest prompt + 2 (SD pads with a token too and lets the UNet attend to every position;
    CLIP's causal mask keeps padding out of the word states). The UNet cross-attends to the text
    encoder's last hidden states, as SD does, at its ``attention_levels`` coarsest resolutions
    (and in the mid block); both are trained. With ``patch`` = p the UNet runs on the image folded
    into p×p blocks (``pixel_unshuffle``: (3, H, W) → (3p², H/p, W/p), lossless, undone on the
    output), the analogue of SD's UNet running on a lower-resolution latent, without a learned VAE.
    The config (prompts and sizes) is enough to rebuild the net: the token table is a
    non-persistent buffer derived from it.
    """

    SPECIAL = ("<pad>", "<bos>", "<eos>")

    def __init__(self, prompts, sample_size: int = 32, channels: int = 3, block_out_channels=(32, 64),
                 layers_per_block: int = 1, norm_num_groups: int = 8, attention_levels: int = 1,
                 attention_heads: int = 4, text_dim: int = 64, text_layers: int = 2, text_heads: int = 4,
                 patch: int = 1):
        super().__init__()
        if sample_size % patch:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch {patch}")
        self.patch = patch
        self.prompts = prompts = [str(p) for p in prompts]
        self.num_classes = len(prompts)
        words = sorted({w for p in prompts for w in p.split()})
        self.vocab = {w: i for i, w in enumerate((*self.SPECIAL, *words))}
        self.max_length = max(len(p.split()) for p in prompts) + 2
        self.register_buffer("tokens", torch.stack([self.tokenize(p) for p in (*prompts, "")]), persistent=False)
        self.text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(self.vocab), hidden_size=text_dim, intermediate_size=4 * text_dim,
            num_hidden_layers=text_layers, num_attention_heads=text_heads,
            max_position_embeddings=self.max_length, pad_token_id=0, bos_token_id=1, eos_token_id=2))
        plain = len(block_out_channels) - attention_levels  # the finest levels: no attention
        self.unet = UNet2DConditionModel(
            sample_size=sample_size // patch, in_channels=channels * patch ** 2, out_channels=channels * patch ** 2,
            layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels,
            up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain,
            norm_num_groups=norm_num_groups, cross_attention_dim=text_dim,
            attention_head_dim=attention_heads,  # diffusers' name for the number of heads here
        )

    def tokenize(self, text: str) -> torch.Tensor:
        """(max_length,) long: <bos> word ids <eos> <pad>…"""
        try:
            ids = [1, *(self.vocab[w] for w in text.split()), 2]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the text_unet vocabulary") from None
        return torch.tensor(ids + [0] * (self.max_length - len(ids)))

    def encode(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, L, text_dim) text states of prompt ids (each distinct prompt encoded once)."""
        ids, inverse = cond.unique(return_inverse=True)
        states = self.text(input_ids=self.tokens[ids]).last_hidden_state
        return states[inverse]

    def forward(self, x, t, cond=None):
        t = t.to(x.dtype).expand(x.shape[0])
        if cond is None:
            cond = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        h = F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x
        h = self.unet(h, t, encoder_hidden_states=self.encode(cond).to(x.dtype)).sample
        return F.pixel_shuffle(h, self.patch) if self.patch > 1 else h


ARCHS = {"mlp": TimeMLP, "unet": TinyUNet, "text_unet": TextUNet}


class VHead(nn.Module):
    """An ε-predictor whose network predicts v (Salimans & Ho 2022, arXiv 2202.00512, §4 and App. D).

    The inner net outputs v̂ ≈ v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, and the head returns
    ε̂ = √ᾱ_t·v̂ + √(1−ᾱ_t)·x_t, which is ε exactly when v̂ = v (x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε).
    Every method and rollout still sees an ε-predictor; only the error's weighting changes: x̂0 =
    √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ stays bounded at high noise, where ε-parametrisation divides ε̂'s error by
    √ᾱ_t (×6.4 at t = 901 on the cosine schedule). ᾱ comes from the diffusers scheduler config the
    head is given (the process's own), so the config rebuilds the net.
    """

    def __init__(self, inner: nn.Module, scheduler: dict):
        super().__init__()
        self.inner = inner
        self.num_classes = getattr(inner, "num_classes", 0)
        acp = DDIMScheduler(**scheduler).alphas_cumprod.double()
        self.register_buffer("alphas_cumprod", acp, persistent=False)

    def _coefficients(self, x, t):
        ab = self.alphas_cumprod[t.round().long().to(self.alphas_cumprod.device)].to(x.dtype)
        ab = ab.reshape(-1, *([1] * (x.dim() - 1)))
        return ab.sqrt(), (1 - ab).sqrt()

    def velocity(self, x, t, cond=None):
        """v̂: the inner network's output (what `pretrain`'s ``v`` objective fits)."""
        return self.inner(x, t, cond)

    def forward(self, x, t, cond=None):
        a, s = self._coefficients(x, t)
        return a * self.inner(x, t, cond) + s * x


def build_net(arch: str, prediction: str, seed: int = 0, dtype=torch.float32, v_head: dict | None = None,
              **cfg) -> nn.Module:
    """Build a random-init tiny network from config; `prediction` is 'epsilon' or 'v'.

    ``v_head`` (a diffusers scheduler config; ε-prediction only) wraps the net in :class:`VHead`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if prediction not in PREDICTION.values():
        raise ValueError(f"unknown prediction {prediction!r}; choose 'epsilon' or 'v'")
    if v_head is not None and prediction != "epsilon":
        raise ValueError("v_head turns a v-network into an ε-predictor: it is for the diffusion process only")
    torch.manual_seed(seed)
    net = ARCHS[arch](**cfg)
    net = (VHead(net, dict(v_head)) if v_head is not None else net).to(dtype)
    net.prediction = prediction
    return net


def frozen_copy(net: nn.Module) -> nn.Module:
    """A detached, frozen copy (the reference model, or the behaviour policy θ†)."""
    ref = copy.deepcopy(net).eval()
    ref.requires_grad_(False)
    return ref


class Policy:
    """A network evaluated at the process's step i with classifier-free guidance.

    o = o(x, ∅) + w·(o(x, c) − o(x, ∅)) when ``cfg_scale != 1`` and a condition is given; the
    two branches run in one batch. Every loss and every rollout calls the network through this
    class, so guidance is identical in both formulations.
    """

    def __init__(self, net: nn.Module, process, cfg_scale: float = 1.0):
        expected = PREDICTION[process.kind]
        got = getattr(net, "prediction", expected)
        if got != expected:
            raise ValueError(f"{process.kind} process needs a {expected}-prediction network, got {got}")
        self.net, self.process, self.cfg_scale = net, process, cfg_scale

    def __call__(self, x: torch.Tensor, i, cond=None) -> torch.Tensor:
        t = self.process.model_t
        t = (t[i] if isinstance(i, int) else t[i.cpu()]).to(device=x.device, dtype=x.dtype)
        t = t.reshape(-1) if t.dim() else t.reshape(1)
        if cond is None or self.cfg_scale == 1.0:
            out = self.net(x, t, cond)
        else:
            null = torch.full_like(cond, self.net.num_classes)
            tt = torch.cat([t, t]) if t.numel() > 1 else t
            both = self.net(torch.cat([x, x]), tt, torch.cat([null, cond]))
            uncond, c = both.chunk(2)
            out = uncond + self.cfg_scale * (c - uncond)
        self.process.check_output(x, out)
        return out

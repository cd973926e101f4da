"""The pinned evaluation of a run: fixed held-out seeds and prompts, the trained sampler.

Metrics (logged under ``eval/``): reward mean/std; path KL to the reference Σ_i KL_i in nats (D·⟨·⟩
per step, along θ's own trajectories); diversity = mean pairwise feature distance; prior preservation
= Fréchet distance between the features of θ's and the base model's samples on the same seeds. Tasks
with an exact optimum (``gmm``) add J = E[r] − α·KL, the gaps to J*, and sliced-W2 to exact target
samples (``rsmbench.data.gmm.GroundTruth``).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from rsmbench.core.models import Policy
from rsmbench.core.rollout import generators, sample

# a run's per-sample eval outcomes (where the reward gives them: ``eval_outcomes``), in its checkpoint directory and
# among its MLflow artifacts under ``ARTIFACTS`` (train.save_outcomes writes it, summary.collect_rows reads it)
OUTCOMES = "eval_outcomes.json"
ARTIFACTS = "samples"


def _features(reward, x):
    f = reward.features(x) if hasattr(reward, "features") else x
    return f.detach().double().reshape(len(f), -1)


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (the FID formula)
    ‖μ1 − μ2‖² + Tr C1 + Tr C2 − 2·Tr (C1·C2)^½.

    With Cj = Xjᵀ·Xj/(nj − 1) (Xj the centred features), the eigenvalues of C1·C2 are the squared
    singular values of X1·X2ᵀ/√((n1−1)(n2−1)), so Tr (C1·C2)^½ is that matrix's nuclear norm: an
    n1×n2 SVD instead of a d×d matrix square root (exact; 1280-d features cost ms, not seconds).
    With thin SVDs Xj = Uj·Sj·Vjᵀ that nuclear norm is ‖S1·V1ᵀ·V2·S2‖_* (a min(n, d)-sized matrix),
    so many samples of few features never form the n1×n2 product."""
    a, b = f1.double().numpy(), f2.double().numpy()
    a_c, b_c = a - a.mean(0), b - b.mean(0)
    n1, n2 = len(a), len(b)
    tr1, tr2 = (a_c**2).sum() / (n1 - 1), (b_c**2).sum() / (n2 - 1)
    _, s1, v1 = np.linalg.svd(a_c, full_matrices=False)
    _, s2, v2 = np.linalg.svd(b_c, full_matrices=False)
    m = (s1[:, None] * v1) @ (v2.T * s2[None, :])
    cross = np.linalg.svd(m, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + tr1 + tr2 - 2 * cross)


def diversity(f: torch.Tensor, max_n: int = 512) -> float:
    """Mean pairwise Euclidean feature distance (first max_n samples)."""
    f = f[:max_n]
    n = len(f)
    return float(torch.cdist(f, f).sum() / (n * (n - 1))) if n > 1 else float("nan")


class Evaluator:
    """The pinned eval protocol (a task's ``eval`` section) on one process; the base model's samples
    are computed once (and shared by the runs of one bench process, ``setup.tiny_evaluator``)."""

    def __init__(self, ev: dict, process, ref: Policy, reward, shape, gt=None, base_extra: dict | None = None,
                 kl_rows: int | None = None):
        self.kl_rows = kl_rows  # states per reference-net call of the path KL, at least one step's batch
        self.process, self.ref, self.reward, self.shape, self.gt = process, ref, reward, shape, gt
        self.prompts = torch.tensor(list(ev["prompts"]))
        n = int(ev["num_samples"])
        self.cond = self.prompts.repeat_interleave(math.ceil(n / len(self.prompts)))[:n]
        self.seeds = [int(ev["seed_start"]) + b for b in range(n)]
        self.stochastic = None if ev["sampler"] == "sde" else torch.zeros(process.num_steps, dtype=torch.bool)
        self.path_kl = bool(ev.get("path_kl", True)) and ev["sampler"] == "sde"
        # the path KL's samples (``eval.kl_samples`` k, for its cost): the first sample of every prompt, then the
        # second of every prompt, ... so that k = the number of prompts covers each prompt once
        per_prompt = math.ceil(n / len(self.prompts))
        k = min(int(ev.get("kl_samples") or n), n)
        self.kl_index = sorted(sorted(range(n), key=lambda b: (b % per_prompt, b))[:k])
        self.dim = int(np.prod(shape))
        self.base = self._sample(ref)
        self.base_feat = _features(reward, self.base.final)
        self.base_extra, self._base_rewards = base_extra or {}, None
        if gt is not None and not base_extra:  # J* = α·log E_base[exp(r/α)] over ``jstar_samples`` base samples
            n_star = int(ev.get("jstar_samples") or 0)
            more = [self._sample(ref, range(n + k, min(n + k + 8192, n_star))).final
                    for k in range(0, n_star - n, 8192)]
            self.base_extra = gt.base_metrics(torch.cat([self.base.final, *more]))

    def _sample(self, policy, index=None):
        """Samples of the eval seeds (``index``: further seeds seed_start + k, prompts cycled alike)."""
        seeds, cond = self.seeds, self.cond
        if index is not None:
            seeds = [self.seeds[0] + k for k in index]
            per_prompt = math.ceil(len(self.cond) / len(self.prompts))
            cond = self.prompts[torch.tensor(list(index)) // per_prompt % len(self.prompts)]
        cond = cond if getattr(policy.net, "num_classes", 0) else None
        return sample(policy, self.shape, generators(seeds), cond=cond, stochastic=self.stochastic,
                      dtype=next(policy.net.parameters()).dtype)

    @torch.no_grad()
    def kl_to_ref(self, ro, index=None) -> torch.Tensor:
        """Per-sample path KL Σ_i D·⟨(μ_θ − μ_ref)²⟩/(2σ_i²) along θ's trajectories (nats), of the samples
        `index` (default: all). The reference
        net sees max(``kl_rows``, one step's batch) (sample, step) states per call, several steps at once.
        Shapes UNet, 22 samples × 10 steps, two 1-thread processes at once (the bench's workers): 64 states
        per call take 0.90× the time of one step (22) per call; 220 at once 1.03× (0.77× with one process)."""
        tr = ro.transitions(only_stochastic=False)  # sample-major rows: sample b, step j at b·n + j
        steps = len(tr) // ro.batch_size
        index = torch.arange(ro.batch_size) if index is None else torch.as_tensor(index)
        keep = (index[:, None] * steps + torch.arange(steps)).flatten()  # the rows of those samples, in order
        kl, rows = torch.empty(len(keep), dtype=torch.float64), max(self.kl_rows or 0, ro.batch_size)
        for lo in range(0, len(keep), rows):
            r = tr.select(keep[lo:lo + rows])
            mu_ref = self.process.mean(r.x, self.ref(r.x, r.step, r.cond), r.step)
            kl[lo:lo + len(r)] = self.process.kl(r.mean, mu_ref, r.step).double()
        return self.dim * kl.view(len(index), -1).sum(1)

    @torch.no_grad()
    def base_rewards(self) -> torch.Tensor:
        """The per-sample rewards of the base model's eval samples (``self.base``), computed once."""
        if self._base_rewards is None:
            self._base_rewards = self.reward(self.base.final, self.base.cond).detach().double().cpu()
        return self._base_rewards

    @torch.no_grad()
    def __call__(self, policy, at_base: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(eval metrics, final samples, their per-sample rewards) of `policy`. ``at_base``: the caller
        guarantees that θ = the base model (iteration 0), whose samples on the pinned seeds are already
        ``self.base``."""
        ro = self.base if at_base else self._sample(policy)
        x = ro.final
        r = self.reward(x, ro.cond).detach().double()
        if at_base:
            self._base_rewards = r.cpu()
        feat = _features(self.reward, x)
        out = {"eval/reward_mean": r.mean().item(), "eval/reward_std": r.std().item(),
               "eval/diversity": diversity(feat), "eval/prior_frechet": frechet(feat, self.base_feat)}
        if self.path_kl:  # at the base model θ = θ_ref: the path KL is 0 exactly
            out["eval/kl_ref"] = 0.0 if at_base else self.kl_to_ref(ro, self.kl_index).mean().item()
        if hasattr(self.reward, "eval_metrics"):  # a task's own protocol (shapes: GenEval's accuracies)
            out.update({f"eval/{k}": v for k, v in self.reward.eval_metrics(x, ro.cond).items()})
        if self.gt is not None:
            gm = self.gt.run_metrics(x, out["eval/reward_mean"], out.get("eval/kl_ref", 0.0),
                                     self.base_extra["J_star_model"])
            out.update({f"eval/{k}": v for k, v in gm.items()})
        return out, x, r.cpu()


def grid_indices(cond: torch.Tensor, n: int = 16) -> list[int]:
    """The eval samples an image grid shows: up to `n`, the first of each prompt in turn (so every
    prompt appears), the same indices (seeds) at every eval."""
    ids = cond.tolist()
    order = list(dict.fromkeys(ids))
    per = {c: [i for i, v in enumerate(ids) if v == c] for c in order}
    out, k = [], 0
    while len(out) < min(n, len(ids)):
        for c in order:
            if k < len(per[c]) and len(out) < n:
                out.append(per[c][k])
        k += 1
    return out


def sample_view(x: torch.Tensor, rewards: torch.Tensor, cond: torch.Tensor, names, label: str, to_images=None,
                base=None, target=None, pass_threshold: float | None = None, audit=None) -> dict:
    """What one sample panel shows (the arguments of ``plot_samples``): for images, the grid's samples
    with "prompt | reward" captions (TRL's convention; prompt names from the task's ``prompts.names``), or,
    for a pass/fail reward (``pass_threshold``: GenEval's strict score), "✓ prompt" / "✗ prompt" and a
    green / red frame, and with ``audit`` (the eval-only detector's 0/1 per sample) how many of the shown pass
    it; for 2-D data every sample with the base model's and the exact target's."""
    if x.dim() == 2 and to_images is None:
        return dict(x=x, label=label, rewards=rewards, base=base, target=target)
    idx = grid_indices(cond, 16)
    imgs = to_images(x[idx]) if to_images is not None else x[idx]
    names = [_short(names[c] if c < len(names or []) else f"prompt {c}") for c in cond[idx].tolist()]
    r = [float(rewards[i]) for i in idx]
    if pass_threshold is None:
        return dict(x=imgs, label=label, captions=[f"{n} | {v:.2f}" for n, v in zip(names, r)])
    passed = [v >= pass_threshold for v in r]
    if label:
        label += f": {sum(passed)} of {len(passed)} pass"
        if audit is not None:
            label += f" ({sum(float(audit[i]) >= pass_threshold for i in idx)} by the audit)"
    return dict(x=imgs, label=label, captions=[f"{'✓' if p else '✗'} {n}" for n, p in zip(names, passed)],
                passed=passed)


def _short(prompt: str, n: int = 22) -> str:
    """A prompt cut to fit above a grid cell, with an ellipsis when cut."""
    return prompt if len(prompt) <= n else prompt[: n - 1].rstrip() + "…"


def plot_samples(path: Path, x: torch.Tensor, title: str, base=None, target=None, rewards=None, captions=None,
                 label: str = "") -> None:
    """A PNG of the eval samples: a scatter plot for 2-D data, an image grid (each image captioned
    ``prompt | reward``) otherwise."""
    plt = _plt()
    fig = plt.figure(figsize=_size(x, 1), dpi=90, layout="constrained")
    grid = x.dim() != 2  # an image grid's label goes in the figure's title (a scatter has its own)
    _panel(fig, dict(x=x, base=base, target=target, rewards=rewards, captions=captions,
                     label="" if grid else label), None)
    fig.suptitle(f"{title}, {label}" if grid and label else title, fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def plot_first_vs_last(path: Path, first: dict, last: dict, title: str) -> None:
    """The iteration-0 and the final panel side by side, on the same eval seeds (and, for 2-D data,
    the same axes); `first`, `last`: ``sample_view`` dicts."""
    plt = _plt()
    fig = plt.figure(figsize=_size(first["x"], 2), dpi=90, layout="constrained")
    left, right = fig.subfigures(1, 2, wspace=0.04)
    frame = _frame(first, last) if first["x"].dim() == 2 else None
    _panel(left, first, frame)
    _panel(right, last, frame)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _size(x, n: int) -> tuple[float, float]:
    if x.dim() == 2:
        return 4.6 * n, 5.3
    rows = math.ceil(min(16, len(x)) / 4)
    return 6.0 * n, 1.65 * rows + 0.6


def _frame(*views) -> tuple:
    """Axis limits from the base model's and the exact target's samples (the model's when neither is
    given), padded: a model that leaves them is counted, not rescaled into a dot."""
    refs = [v[k] for v in views for k in ("target", "base") if v.get(k) is not None]
    pts = torch.cat([r.detach().float().cpu()[:, :2] for r in refs]) if refs else \
        torch.cat([v["x"].detach().float().cpu() for v in views])
    pts = pts[torch.isfinite(pts).all(1)]
    if not len(pts):
        return (-1.0, 1.0), (-1.0, 1.0)
    lo, hi = torch.quantile(pts, 0.001, dim=0), torch.quantile(pts, 0.999, dim=0)
    pad = 0.15 * (hi - lo).clamp_min(1e-3)
    return (float(lo[0] - pad[0]), float(hi[0] + pad[0])), (float(lo[1] - pad[1]), float(hi[1] + pad[1]))


def _panel(fig, view: dict, frame) -> None:
    x = view["x"].detach().float().cpu()
    if x.dim() == 2:
        _scatter(fig.subplots(), view, frame or _frame(view))
        return
    n = min(16, len(x))
    imgs = ((x[:n].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    ax = fig.subplots()
    _mosaic(ax, imgs, view.get("captions") or [], min(4, n), view.get("passed"))
    if view.get("label"):
        fig.suptitle(view["label"], fontsize=8.5)


PASS_FAIL = (np.array([0.84, 0.15, 0.16]), np.array([0.17, 0.63, 0.17]))  # red ✗, green ✓ (tab: colours)


def plot_captioned_grid(path: Path, x: torch.Tensor, captions, passed=None, ncol: int = 6, title: str = "") -> None:
    """A PNG grid of images in [−1, 1], each under its caption (wrapped to two lines) and, when ``passed``
    is given, with ✓/✗ and a green / red frame (GenEval's pass/fail; shapes' sample grids)."""
    plt = _plt()
    imgs = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    caps = ["\n".join(textwrap.wrap(("" if passed is None else "✓ " if ok else "✗ ") + str(c), 25, max_lines=2,
                                     placeholder="…"))
            for c, ok in zip(captions, passed if passed is not None else [None] * len(captions))]
    cols = min(ncol, len(imgs))
    fig, ax = plt.subplots(dpi=100, layout="constrained")
    h, w = _mosaic(ax, imgs, caps, cols, passed, lines=2, fontsize=6)
    fig.set_size_inches(cols * 1.2, cols * 1.2 * h / w + (0.35 if title else 0.1))
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def _mosaic(ax, imgs: np.ndarray, captions, cols: int, passed=None, lines: int = 1, fontsize: float = 6.5):
    """Images (n, h, w, c in [0, 1]) tiled on one white canvas, `cols` per row, each under its caption of
    up to `lines` lines (and in a green / red frame where `passed` says pass / fail): one axes, where an
    axes per image made each grid cost ~1.5 s of layout. Returns the canvas's (height, width)."""
    n, h, w = imgs.shape[:3]
    rows, gap, band = math.ceil(n / cols), max(1, w // 16), round(max(4, h * 0.3) * (0.6 + 0.4 * lines))
    m = 1 if passed is not None else 0  # the frame's width, in pixels of the canvas
    gap += 2 * m
    canvas = np.ones((rows * (band + h + gap) - gap + 2 * m, cols * (w + gap) - gap + 2 * m, 3))
    for k in range(n):
        r, q = divmod(k, cols)
        y0, x0 = r * (band + h + gap) + band + m, q * (w + gap) + m
        if passed is not None and k < len(passed):
            canvas[y0 - m:y0 + h + m, x0 - m:x0 + w + m] = PASS_FAIL[bool(passed[k])]
        canvas[y0:y0 + h, x0:x0 + w] = imgs[k] if imgs.shape[-1] == 3 else imgs[k][..., :1]
        if k < len(captions):
            ax.text(x0 + w / 2, y0 - m - 0.5, captions[k], ha="center", va="bottom", fontsize=fontsize,
                    linespacing=1.0)
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    return canvas.shape[:2]


def _scatter(ax, view: dict, frame) -> None:
    (x0, x1), (y0, y1) = frame
    x = view["x"].detach().float().cpu()
    refs = ((view.get("target"), "tab:green", "exact target"), (view.get("base"), "tab:gray", "base model"))
    for pts, c, lab in refs:
        if pts is not None:
            p = pts[:2048].detach().float().cpu()
            ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.3, c=c, label=lab, rasterized=True)
    finite = torch.isfinite(x).all(1)
    inside = finite & (x[:, 0] >= x0) & (x[:, 0] <= x1) & (x[:, 1] >= y0) & (x[:, 1] <= y1)
    p = x[inside][:2048]
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.45, c="tab:red", label="model", rasterized=True)
    n_out = int((~inside).sum())
    if n_out:  # outside the frame: drawn on it as ✕, and counted
        q = x[~inside & finite][:512]
        ax.scatter(q[:, 0].clamp(x0, x1), q[:, 1].clamp(y0, y1), marker="x", s=18, c="tab:red", clip_on=False,
                   label="model, outside the axes (on the frame)")
        n_nan = int((~finite).sum())
        ax.text(0.5, 0.02, f"{n_out} of {len(x)} model samples outside the axes"
                + (f" ({n_nan} not finite)" if n_nan else "") + f"; max |x| = {x[finite].abs().max():.3g}"
                if finite.any() else f"{n_out} of {len(x)} model samples not finite",
                transform=ax.transAxes, ha="center", va="bottom", color="tab:red", fontsize=8,
                bbox=dict(facecolor="white", edgecolor="tab:red", alpha=0.9))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=7, markerscale=3, frameon=False)
    r = view.get("rewards")
    mean = f" | mean reward {float(r.double().mean()):.3f} over {len(r)} samples" if r is not None else ""
    ax.set_title((view.get("label") or "") + mean, fontsize=8.5)

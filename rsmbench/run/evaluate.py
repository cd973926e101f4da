"""The pinned evaluation of a run: fixed held-out seeds and prompts, the trained sampler.

Metrics (logged under ``eval/``): reward mean/std; path KL to the reference Σ_i KL_i in nats (D·⟨·⟩
per step, along θ's own trajectories); diversity = mean pairwise feature distance; prior preservation
= Fréchet distance between the features of θ's and the base model's samples on the same seeds. Tasks
with an exact optimum (``gmm``) add J = E[r] − α·KL, the gaps to J*, and sliced-W2 to exact target
samples (``rsmbench.data.gmm.GroundTruth``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rsmbench.core.models import Policy
from rsmbench.core.rollout import generators, sample


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

    def __init__(self, ev: dict, process, ref: Policy, reward, shape, gt=None):
        self.process, self.ref, self.reward, self.shape, self.gt = process, ref, reward, shape, gt
        self.prompts = torch.tensor(list(ev["prompts"]))
        n = int(ev["num_samples"])
        self.cond = self.prompts.repeat_interleave(math.ceil(n / len(self.prompts)))[:n]
        self.seeds = [int(ev["seed_start"]) + b for b in range(n)]
        self.stochastic = None if ev["sampler"] == "sde" else torch.zeros(process.num_steps, dtype=torch.bool)
        self.path_kl = bool(ev.get("path_kl", True)) and ev["sampler"] == "sde"
        self.dim = int(np.prod(shape))
        self.base = self._sample(ref)
        self.base_feat = _features(reward, self.base.final)
        self.base_extra = {}
        if gt is not None:  # J* = α·log E_base[exp(r/α)]: log-mean-exp over ``jstar_samples`` base samples
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
    def kl_to_ref(self, ro) -> torch.Tensor:
        """Per-sample path KL Σ_i D·⟨(μ_θ − μ_ref)²⟩/(2σ_i²) along θ's trajectories (nats)."""
        total = torch.zeros(ro.batch_size, dtype=torch.float64)
        for j, i in enumerate(ro.steps.tolist()):
            x = ro.states[:, j]
            mu_ref = self.process.mean(x, self.ref(x, i, ro.cond), i)
            total += self.dim * self.process.kl(ro.means[:, j], mu_ref, i).double()
        return total

    @torch.no_grad()
    def __call__(self, policy, at_base: bool = False) -> tuple[dict, torch.Tensor]:
        """Eval metrics of `policy` and its final samples. ``at_base``: the caller guarantees that
        θ = the base model (iteration 0), whose samples on the pinned seeds are already ``self.base``."""
        ro = self.base if at_base else self._sample(policy)
        x = ro.final
        r = self.reward(x, ro.cond).detach().double()
        feat = _features(self.reward, x)
        out = {"eval/reward_mean": r.mean().item(), "eval/reward_std": r.std().item(),
               "eval/diversity": diversity(feat), "eval/prior_frechet": frechet(feat, self.base_feat)}
        if self.path_kl:
            out["eval/kl_ref"] = self.kl_to_ref(ro).mean().item()
        if hasattr(self.reward, "eval_metrics"):  # a task's own protocol (shapes: GenEval's accuracies)
            out.update({f"eval/{k}": v for k, v in self.reward.eval_metrics(x, ro.cond).items()})
        if self.gt is not None:
            gm = self.gt.run_metrics(x, out["eval/reward_mean"], out.get("eval/kl_ref", 0.0),
                                     self.base_extra["J_star_model"])
            out.update({f"eval/{k}": v for k, v in gm.items()})
        return out, x


def plot_samples(path: Path, x: torch.Tensor, title: str, base=None, target=None) -> None:
    """A PNG of the eval samples: a scatter plot for 2-D data, an image grid otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu()
    if x.dim() == 2:
        fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=90)
        for pts, c, lab in ((target, "tab:green", "exact target"), (base, "tab:gray", "base"), (x, "tab:red", "model")):
            if pts is not None:
                p = pts[:1024].float()
                ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.35, c=c, label=lab)
        ax.set_xlim(-7, 7), ax.set_ylim(-6, 8), ax.legend(loc="upper right", fontsize=7, markerscale=4)
    else:
        n = min(16, len(x))
        imgs = ((x[:n].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        cols = 4
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2), dpi=90, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                ax.imshow(imgs[k].squeeze(), cmap="gray" if imgs[k].shape[-1] == 1 else None)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)

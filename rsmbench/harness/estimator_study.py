"""Estimator study on `gmm` (the RSM paper's Figure 2; arXiv 2604.17415, derivations §4.2–4.3).

At 50 fixed points x_t (x_t = √ᾱ_t·x_data + √(1−ᾱ_t)·n, x_data from the tilted target p*) of the
`gmm` task's diffusion grid (20-step DDPM, T = 1000 linear β; evaluation step with ᾱ_t = 0.0134,
the grid point nearest the toy's ᾱ_t ≈ 0.01), every value-guidance estimate Ψ̂_t(x_t) is compared,
in score units, with the exact Ψ_t(x_t) = ∇log p*_t − ∇log p_ref,t of the mixture
(``rsmbench.data.gmm.GroundTruth.value_gradient``). RMSE over points = √(mean_p ‖Ψ̂_p − Ψ_p‖²).

Rollouts from x_t use a *model* of the reference marginals:
- ``exact``: the exact ε of the mixture's noised marginal (no model error: all bias is the
  estimator's own plus time discretisation);
- ``base``: the committed pretrained base network of the task (``tasks/gmm.yaml``), when present;
  its approximation error adds to the bias. (The paper's toy rolls out its *fine-tuned* model.)

Estimators (shared code, native → score units with ``rsmbench.core.rsm.to_score``):
- zeroth-order likelihood ratio ``estimators.likelihood_ratio`` (derivations §4.2): Ψ̂ = (σ/Ω)·mean[A·ξ]/α,
  A = r (no control variate, "PPO-like") or r − mean r (group mean, "GRPO-like");
- first-order current-state ``first.current_state`` (DPS/Tweedie, ‡), k-step lookahead
  ``first.lookahead`` (SQDF-2 = k = 2 DDIM steps then Tweedie), next-state ``first.next_state`` +
  ``first.stein_shift`` (transition-level Stein, averaged over sampled next states): Ψ̂ = ∇(…)/α.
Panels: (1) RMSE vs #samples; (2) lookahead depth (FO: k steps of ODE before Tweedie; ZO: stop the
rollout k steps after t and use r(x̂0) there); (3) Branch-GRPO trees at equal NFE; (4) stochasticity
localisation (one SDE step then ODE, TempFlow-GRPO) vs full SDE, against the exact Ψ and against its
own high-sample reference (variance only); (5) base model vs exact-score rollouts (model bias; panel (1)
only, for the time budget).
Panel (1) also draws the exact one-step Doob target (``doob_target``) against Ψ_t: the floor that the
transition-level estimators (ZO, next-state) approach as samples grow on this 20-step grid.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rsmbench.core import style, tree
from rsmbench.core.checkpoints import load_checkpoint
from rsmbench.core.estimators import first as fo
from rsmbench.core.estimators import likelihood_ratio
from rsmbench.core.models import Policy
from rsmbench.core.rollout import Transitions
from rsmbench.core.rsm import to_score
from rsmbench.data import gmm
from rsmbench.run import tasks

TASK = "gmm"
KIND = "diffusion"
TARGET_ALPHABAR = 0.01
N_POINTS = 50
LOG2_N = {"full": (4, 6, 8, 10, 12), "quick": (4, 6, 8)}  # paper: 4…16; scaled down for 2 CPU cores
BRANCH_CONFIGS = ((1, 1), (2, 2), (3, 2), (4, 2), (2, 4))  # (#split, #branch), derivations §4.2


class ExactNet(torch.nn.Module):
    """ε of the mixture's exact noised marginal: ε(x_t) = −√(1−ᾱ_t)·∇log p_t(x_t) (derivations §2.2)."""

    prediction = "epsilon"
    num_classes = 0

    def __init__(self, mixture: gmm.Mixture, process):
        super().__init__()
        self.mixture, self.acp = mixture, process.scheduler.alphas_cumprod.double()

    def forward(self, x, t, cond=None):
        t = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t.reshape(-1)
        out = torch.empty_like(x)
        for tv in torch.unique(t):
            sel = t == tv
            ab = float(self.acp[int(round(float(tv)))])
            s = self.mixture.affine(math.sqrt(ab), math.sqrt(1 - ab)).score(x[sel])
            out[sel] = (-math.sqrt(1 - ab) * s).to(x.dtype)
        return out


# ---- setting ---------------------------------------------------------------------------------------
class Setting:
    """Task, process, reward, ground truth, evaluation step and the 50 fixed points."""

    def __init__(self, n_points: int = N_POINTS, seed: int = 0, base_checkpoint=None):
        self.cfg = tasks.load(TASK)
        self.process = tasks.build_process(self.cfg, KIND)
        self.reward = tasks.build_reward(self.cfg)
        self.truth = tasks.ground_truth(self.cfg, self.reward)
        self.alpha = float(self.cfg.alpha)
        ab = self.process.alphas_cumprod_t
        self.i = int(torch.argmin((ab.log() - math.log(TARGET_ALPHABAR)).abs()))
        self.alphabar = float(ab[self.i])
        g = torch.Generator().manual_seed(seed)
        x_data = self.truth.target.sample(n_points, g)
        sc, ns = gmm.marginal_coeffs(self.process, self.i)
        self.points = sc * x_data + ns * torch.randn(x_data.shape, generator=g, dtype=torch.float64)
        self.psi_true = self.truth.value_gradient(self.process, self.i, self.points)
        self.a = self.process.score_a[self.i]
        self.models = {"exact": Policy(ExactNet(self.truth.ref, self.process), self.process)}
        self.model_note = f"base checkpoint {base_checkpoint or self.cfg.processes[KIND].model.checkpoint}"
        try:
            if base_checkpoint is None:
                net = tasks.load_base(self.cfg, KIND, torch.float64)
            else:  # another checkpoint of the same task (hash-checked)
                net = load_checkpoint(base_checkpoint, task=TASK)[0].to(torch.float64)
            self.models["base"] = Policy(net, self.process)
        except Exception as e:  # missing/corrupt checkpoint: the study runs on exact-score rollouts
            self.model_note = f"base model skipped: {str(e).splitlines()[0]}"


# ---- rollouts (vectorised: one generator per call; reproducible given the seed) -------------------------
@torch.no_grad()
def rollout(policy, x, start: int, end: int, gen, stochastic=None):
    """Run steps [start, end) from x; returns (first-step noise ξ, state at `end`)."""
    p = policy.process
    xi0 = None
    for j in range(start, end):
        sto = True if stochastic is None else bool(stochastic[j])
        xi = torch.randn(x.shape, generator=gen, dtype=torch.float64) if sto else torch.zeros_like(x)
        x, _ = p.step(x, policy(x, j, None), j, xi, stochastic=sto)
        xi0 = xi if xi0 is None else xi0
    return xi0, x


@torch.no_grad()
def tweedie_reward(policy, reward, x, step: int):
    """r(x̂0(x)) at process step `step` (r(x) itself after the last step)."""
    p = policy.process
    if step >= p.num_steps:
        return reward(x, None)
    return reward(p.tweedie(x, policy(x, step, None), step), None)


def rows_at(process, i: int, x: torch.Tensor, noise: torch.Tensor) -> Transitions:
    """Transition rows at step i (what the shared estimators read: x, noise, step, stochastic)."""
    R = len(x)
    z = torch.zeros_like(x)
    return Transitions(x=x, x_next=z, noise=noise, mean=z, out_behaviour=z,
                       log_prob=torch.zeros(R, dtype=x.dtype), step=torch.full((R,), i, dtype=torch.long),
                       stochastic=torch.ones(R, dtype=torch.bool), sample=torch.arange(R), cond=None)


def zo_estimate(S: Setting, noise: torch.Tensor, r: torch.Tensor, cv) -> torch.Tensor:
    """Ψ̂ (score units) per point from (P, n) rewards and (P, n, d) first-step noises.
    cv: False (A = r), True (A = r − mean r), or 'tilted' (A = α·(e^{r/α}/mean e^{r/α} − 1): the
    self-normalised Doob weights of derivations §2.1, μ* − μ_ref = σ·E[ξ·h]/E[h], exact beyond small 1/α)."""
    P, n, d = noise.shape
    if cv == "tilted":
        A = S.alpha * (torch.softmax(r / S.alpha, dim=1) * n - 1)
    else:
        A = r - r.mean(dim=1, keepdim=True) if cv else r
    rows = rows_at(S.process, S.i, S.points.repeat_interleave(n, 0), noise.reshape(P * n, d))
    psi_native = likelihood_ratio(S.process, rows, A.reshape(-1), beta=S.alpha).reshape(P, n, d).mean(1)
    return to_score(S.a.expand(P), psi=psi_native)[1]


@torch.no_grad()
def doob_target(S: Setting, n: int = 2**16, seed: int = 9) -> torch.Tensor:
    """The exact one-step target of every transition-level estimator (derivations §2.1): the Doob step's
    mean shift μ* − μ_ref = σ·E[ξ·h(x')]/E[h(x')], x' = μ_ref(x_t) + σξ, with the exact
    h(x') ∝ p*_{t'}(x')/p_ref,t'(x') of the mixtures (self-normalised over n draws of ξ), in score
    units (÷Ω). Its distance to Ψ_t(x_t) is the time-discretisation floor of the 20-step grid."""
    p, P, d = S.process, *S.points.shape
    mu = p.mean(S.points, S.models["exact"](S.points, S.i, None), S.i)
    std = float(p.std(S.i))
    xi = torch.randn((P, n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x1 = (mu[:, None] + std * xi).reshape(P * n, d)
    ab = float(p.alphas_cumprod_prev[S.i])
    sc, ns = math.sqrt(ab), math.sqrt(1 - ab)
    logh = S.truth.target.affine(sc, ns).log_prob(x1) - S.truth.ref.affine(sc, ns).log_prob(x1)
    w = torch.softmax(logh.reshape(P, n), dim=1)
    return std * (w[..., None] * xi).sum(1) / float(p.omega(S.i))


def rmse(est: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    e = ((est - truth) ** 2).sum(-1)
    return math.sqrt(e.mean().item()), e.sqrt().std().item()


def _sde_samples(S, policy, n: int, gen, end=None, stochastic=None):
    """n rollouts per point from x_t: (ξ (P, n, d), state at `end`, flattened)."""
    P, d = S.points.shape
    end = S.process.num_steps if end is None else end
    xi, x_end = rollout(policy, S.points.repeat_interleave(n, 0), S.i, end, gen, stochastic)
    return xi.reshape(P, n, d), x_end


# ---- panels ---------------------------------------------------------------------------------------------
def panel_samples(S, model: str, log2_n, seed: int = 1) -> list[dict]:
    """ZO with / without control variate vs #samples (nested subsets of one draw), FO lines."""
    pol, out = S.models[model], []
    n_max = 2 ** max(log2_n)
    xi, x0 = _sde_samples(S, pol, n_max, torch.Generator().manual_seed(seed))
    r = S.reward(x0, None).reshape(len(S.points), n_max)
    for ln in log2_n:
        n = 2**ln
        for cv, name in ((False, "ZO w/o control variate"), (True, "ZO w/ control variate"),
                         ("tilted", "ZO exp-tilted weights")):
            m, s = rmse(zo_estimate(S, xi[:, :n], r[:, :n], cv), S.psi_true)
            out.append(dict(estimator=name, n_samples=n, rmse=m, rmse_std=s))
        # next-state Stein estimator (first-order, stochastic): mean over n sampled next states
        out.append(dict(estimator="FO next-state (Stein)", n_samples=n,
                        **_fo_next_state(S, pol, n, seed)))
    g_cur = fo.current_state(pol, S.reward, S.points, torch.full((len(S.points),), S.i), None)
    g_la = fo.lookahead(pol, S.reward, S.points, torch.full((len(S.points),), S.i), None, k=2)
    lines_ = [("FO current-state (DPS)", g_cur), ("FO lookahead (SQDF-2)", g_la)]
    if model == "exact":  # the discretisation floor of every transition-level estimator
        lines_.append(("exact one-step Doob target (floor)", doob_target(S)))
    for name, g in lines_:
        g = g if name.startswith("exact") else g / S.alpha
        m, s = rmse(g, S.psi_true)
        out += [dict(estimator=name, n_samples=2**ln, rmse=m, rmse_std=s) for ln in log2_n]
    return [dict(panel="samples", model=model, **o) for o in out]


def _fo_next_state(S, pol, n: int, seed: int) -> dict:
    P, d = S.points.shape
    gen = torch.Generator().manual_seed(seed + 7)
    x = S.points.repeat_interleave(n, 0)
    xi = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        x_next, _ = S.process.step(x, pol(x, S.i, None), S.i, xi)
    rows = rows_at(S.process, S.i, x, xi)
    rows.x_next = x_next
    g = fo.next_state(pol, S.reward, rows)
    psi_native = fo.stein_shift(S.process, rows, g, 1.0 / S.alpha).reshape(P, n, d).mean(1)
    m, s = rmse(to_score(S.a.expand(P), psi=psi_native)[1], S.psi_true)
    return dict(rmse=m, rmse_std=s)


def panel_lookahead(S, model: str, n: int, seed: int = 2) -> list[dict]:
    """Depth k = steps simulated after t before Tweedie: FO (ODE lookahead), ZO (SDE, stop at k)."""
    pol, N, P = S.models[model], S.process.num_steps, len(S.points)
    out, ts = [], S.process.timesteps
    for k in range(0, N - S.i + 1):
        ratio = float(ts[S.i + k]) / float(ts[S.i]) if S.i + k < N else 0.0
        g = fo.lookahead(pol, S.reward, S.points, torch.full((P,), S.i), None, k=k)
        m, s = rmse(g / S.alpha, S.psi_true)
        out.append(dict(estimator="FO lookahead", depth=k, t_ratio=ratio, n_samples=1, rmse=m, rmse_std=s))
        if k >= 1:
            xi, xk = _sde_samples(S, pol, n, torch.Generator().manual_seed(seed), end=S.i + k)
            r = tweedie_reward(pol, S.reward, xk, S.i + k).reshape(P, n)
            m, s = rmse(zo_estimate(S, xi, r, True), S.psi_true)
            out.append(dict(estimator="ZO lookahead (w/ CV)", depth=k, t_ratio=ratio, n_samples=n, rmse=m, rmse_std=s))
    return [dict(panel="lookahead", model=model, **o) for o in out]


def branch_splits(S, n_split: int) -> list[int]:
    """#split evenly spaced split steps starting at the evaluation step (the first at t itself)."""
    rem = S.process.num_steps - S.i
    gap = max(1, rem // (n_split + 1))
    return [S.i + j * gap for j in range(n_split)]


@torch.no_grad()
def branch_estimate(S, pol, n_roots: int, n_split: int, n_branch: int, gen) -> torch.Tensor:
    """Branch-GRPO tree from each point: children at every split share their prefix; each first-step
    child is valued by the mean reward of its leaves ('mean' fusion); ZO estimate with the group mean."""
    P, d = S.points.shape
    splits = branch_splits(S, n_split)
    bounds = [*splits, S.process.num_steps]
    x = S.points.repeat_interleave(n_roots, 0)  # roots: (P·n_roots)
    xi0 = None
    for j, s in enumerate(splits):
        x = x.repeat_interleave(n_branch, 0)
        xi, x = rollout(pol, x, s, bounds[j + 1], gen)
        xi0 = xi if j == 0 else xi0
    leaves_per_child = n_branch ** (n_split - 1)
    r = S.reward(x, None).reshape(-1, leaves_per_child).mean(1)  # value of each first-step child
    c = n_roots * n_branch
    return zo_estimate(S, xi0.reshape(P, c, d), r.reshape(P, c), True)


def panel_branching(S, model: str, log2_nfe, seed: int = 3) -> list[dict]:
    pol, out = S.models[model], []
    rem = S.process.num_steps - S.i
    for n_split, n_branch in BRANCH_CONFIGS:
        splits = [s - S.i for s in branch_splits(S, n_split)]
        nfe_root = tree.nfe_branching(splits[1:], [n_branch] * (n_split - 1), rem) * n_branch \
            if n_split > 0 else rem  # the root's first segment starts with n_branch children at t
        for le in log2_nfe:
            n_roots = max(1, 2**le // nfe_root)
            est = branch_estimate(S, pol, n_roots, n_split, n_branch, torch.Generator().manual_seed(seed + le))
            m, s = rmse(est, S.psi_true)
            out.append(dict(panel="branching", model=model, estimator=f"split {n_split} × branch {n_branch}",
                            nfe=n_roots * nfe_root, n_samples=n_roots * n_branch ** n_split, rmse=m, rmse_std=s))
    return out


def panel_localization(S, model: str, log2_n, n_ref: int, seed: int = 4) -> list[dict]:
    """One SDE step at t then ODE (TempFlow-GRPO) vs full SDE, against the exact Ψ and against each
    sampler's own n_ref-sample reference (the variance part only)."""
    pol, N, P = S.models[model], S.process.num_steps, len(S.points)
    out = []
    for name, mask in (("full SDE", None), ("SDE at t, then ODE", tree.sde_window(N, S.i, S.i + 1))):
        xi, x0 = _sde_samples(S, pol, n_ref, torch.Generator().manual_seed(seed), stochastic=mask)
        r = S.reward(x0, None).reshape(P, n_ref)
        ref = zo_estimate(S, xi, r, True)
        for ln in log2_n:
            n = 2**ln
            xi_n, x_n = _sde_samples(S, pol, n, torch.Generator().manual_seed(seed + 100 + ln), stochastic=mask)
            est = zo_estimate(S, xi_n, S.reward(x_n, None).reshape(P, n), True)
            for against, truth in (("exact Ψ", S.psi_true), ("own reference", ref)):
                m, s = rmse(est, truth)
                out.append(dict(panel="localization", model=model, estimator=f"{name} vs {against}",
                                n_samples=n, rmse=m, rmse_std=s))
    return out


def study(quick: bool = False, models=None, n_points: int | None = None,
          base_checkpoint=None) -> tuple[pd.DataFrame, dict]:
    t0 = time.perf_counter()
    S = Setting(n_points or (16 if quick else N_POINTS), base_checkpoint=base_checkpoint)
    log2_n = LOG2_N["quick" if quick else "full"]
    models = [m for m in (models or list(S.models)) if m in S.models]
    rows = []
    for model in models:
        rows += panel_samples(S, model, log2_n)
        if model != "exact":  # panels (b)–(d) on exact-score rollouts only (the 5-minute budget)
            continue
        rows += panel_lookahead(S, model, 2 ** (8 if quick else 10))
        rows += panel_branching(S, model, [ln + 4 for ln in log2_n])
        rows += panel_localization(S, model, log2_n, 2 ** (max(log2_n) + 2))
    df = pd.DataFrame(rows)
    info = dict(step=S.i, timestep=int(S.process.timesteps[S.i]), alphabar=S.alphabar, n_points=len(S.points),
                log2_n=log2_n, models=models, model_note=S.model_note, seconds=time.perf_counter() - t0)
    return df, info


ESTIMATOR_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                    "#bcbd22", "#000075")


def _family(est: str) -> str:
    return "first" if est.startswith("FO") else "zeroth"


def plot(df: pd.DataFrame, out_dir, name: str = "estimator_study") -> list[Path]:
    """A 3 × 2 grid of panels (a)–(e), each with its legend under it; zeroth-order estimators solid with
    filled markers, first-order dashed with open markers (``rsmbench.core.style``); error bars: ±1 std of
    the per-point error ‖Ψ̂_p − Ψ_p‖ over the points, drawn from the ``rmse_std`` column."""
    style.use()
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, 2, figsize=(style.WIDTH, 13.0), layout="constrained")
    ax = axes.flat

    def lines(a, sub, x, label_fn=lambda e, m: e, model_ls=None):
        groups = list(sub.groupby(["estimator", "model"], sort=False))
        colors = {e: ESTIMATOR_COLORS[i % len(ESTIMATOR_COLORS)] for i, e in enumerate(dict.fromkeys(sub.estimator))}
        for j, ((est, model), g) in enumerate(groups):
            g = g.sort_values(x)
            xs = np.log2(g[x].to_numpy(float)) if x in ("n_samples", "nfe") else g[x].to_numpy(float)
            xs = xs + 0.05 * (j - (len(groups) - 1) / 2)  # dodge so that the bars do not overlap
            fam = _family(est)
            lo = np.minimum(g.rmse_std, 0.9 * g.rmse)  # a log axis: the lower bar stops above 0
            ls = (model_ls or {}).get(model, style.LINESTYLE[fam])
            a.errorbar(xs, g.rmse, yerr=[lo, g.rmse_std], color=colors[est], ls=ls, marker="os^Dv<>ph*"[j % 10],
                       ms=4.5, mfc=colors[est] if fam == "zeroth" else "white", mec=colors[est], capsize=2,
                       elinewidth=0.8, lw=1.4, label=label_fn(est, model))

    first = "exact" if "exact" in set(df.model) else df.model.iloc[0]  # (a)–(d): one model; (e) compares
    df_all, df = df, df[df.model == first]
    lines(ax[0], df[df.panel == "samples"], "n_samples")
    ax[0].set(xlabel="log₂ #samples", title="(a) samples: ZO (± control variate) vs FO")
    lines(ax[1], df[df.panel == "lookahead"], "depth")
    ax[1].set(xlabel="lookahead depth k [steps after t]", title="(b) lookahead depth")
    lines(ax[2], df[df.panel == "branching"], "nfe")
    ax[2].set(xlabel="log₂ NFE", title="(c) Branch-GRPO trees at equal NFE (ZO, CV)")
    lines(ax[3], df[df.panel == "localization"], "n_samples")
    ax[3].set(xlabel="log₂ #samples", title="(d) stochasticity localisation")
    d = df_all[(df_all.panel == "samples") & df_all.estimator.isin(
        ["ZO w/ control variate", "ZO exp-tilted weights", "FO current-state (DPS)", "FO next-state (Stein)"])]
    ax[4].set(title="(e) base model vs exact-score rollouts", xlabel="log₂ #samples")
    if d.model.nunique() > 1:
        lines(ax[4], d, "n_samples", label_fn=lambda e, m: f"{e} [{m}]", model_ls={"exact": "-", "base": ":"})
    else:
        ax[4].text(0.5, 0.5, "base checkpoint not available:\nexact-score rollouts only", ha="center",
                   va="center", transform=ax[4].transAxes)
    for a in list(ax)[:5]:
        a.set_yscale("log")
        a.set_ylabel("RMSE of Ψ̂ [score units]")
        if a.lines:
            a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=style.FONT - 1.5)
    h, lab = style.family_handles()
    ax[5].set_axis_off()
    ax[5].legend(h + [plt.Line2D([], [], color="0.3", ls=":", marker="o")],
                 lab + ["(e) only: dotted = rollouts of the base network"], loc="center", title="style")
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=style.DPI)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def caption(info: dict) -> str:
    return (
        f"Estimator study on gmm (RSM Figure 2 analogue). RMSE (score units, √mean over {info['n_points']} fixed "
        f"points of ‖Ψ̂ − Ψ‖²; error bars: ±1 std over the points of the per-point error ‖Ψ̂_p − Ψ_p‖, the lower "
        f"bar cut at 10 % of the RMSE on the log axis; markers dodged sideways so that bars do not overlap) of "
        f"value-guidance estimates at step "
        f"{info['step']} of the task's 20-step DDPM grid (timestep {info['timestep']}, ᾱ_t = {info['alphabar']:.4f}, "
        f"the grid point nearest ᾱ_t = 0.01), against the exact Ψ_t of the tilted mixture. Rollouts from x_t use the "
        f"exact mixture score ('exact': no model error) and, where available, the pretrained base network ('base'; "
        f"{info['model_note']}). (a) zeroth-order likelihood ratio without/with the group-mean control variate "
        f"and with self-normalised exp-tilted weights, the exact one-step Doob target (the 20-step grid's "
        f"discretisation floor), "
        f"and first-order current-state (DPS), 2-step lookahead (SQDF-2) and next-state Stein estimates, vs #samples "
        f"(log₂ n ∈ {list(info['log2_n'])}, scaled down from the paper's 4…16 for a 2-core CPU); (b) lookahead depth k "
        f"(FO: k ODE steps then Tweedie; ZO: reward of x̂0 k steps after t); (c) Branch-GRPO trees (#split, #branch) at "
        f"equal NFE; (d) one SDE step then ODE vs full SDE, against the exact Ψ and against each sampler's own "
        f"4×-larger-sample reference (variance only); (e) base vs exact rollouts (dotted: the base network's "
        f"rollouts). Zeroth-order estimators are solid lines with filled markers, first-order dashed with open "
        f"markers. Runtime {info['seconds']:.0f} s."
    )


def run(out_dir, quick: bool = False, base_checkpoint=None) -> tuple[pd.DataFrame, str]:
    """The five panels; writes estimator_study.{png,pdf,csv}; returns (tidy DataFrame, caption).
    `base_checkpoint`: a gmm diffusion checkpoint other than the task's committed one."""
    df, info = study(quick, base_checkpoint=base_checkpoint)
    plot(df, out_dir)
    df.to_csv(Path(out_dir) / "estimator_study.csv", index=False)
    return df, caption(info)

"""The report's figures, drawn from its configurations (``rsmbench.analysis.report.Entry``).

Every figure uses the method styles of ``rsmbench.core.style`` (one colour and marker per method;
zeroth-order solid and filled, first-order dashed and open), a grid of panels at page width and one
legend under the panels. Diverged configurations are drawn only where their history means something
(the efficiency curves, up to the divergence, ending in ✕); axis limits come from the sane
configurations only; figures of final values leave them out and their captions list them.
Each function returns a ``Figure`` (its files, caption and, for the tests, its panels' axis limits) or
None when there is nothing to draw.
"""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsmbench.analysis import stats
from rsmbench.core import style
from rsmbench.errors import ReportError

X_AXES = (("train/reward_queries", "reward queries"), ("train/nfe", "network evaluations (NFE)"),
          ("train/wall_time", "training wall-clock [s]"))
LABELS = {"eval/reward_mean": "eval reward (mean over eval samples)", "eval/J": "J = E[r] − α·KL (eval)",
          "eval/J_gap": "J-gap = J* − J", "eval/kl_ref": "KL to the reference [nats]",
          "eval/diversity": "diversity [mean pairwise distance]"}
SHORT = {"eval/reward_mean": "eval reward", "eval/J": "J (eval)", "eval/J_gap": "J-gap", "eval/kl_ref": "KL [nats]"}


@dataclass
class Figure:
    files: list
    caption: str
    limits: dict = field(default_factory=dict)  # panel name -> (xlim, ylim)


def _plt():
    style.use()
    import matplotlib.pyplot as plt

    return plt


def _evals(run: dict, y: str, x: str | None = None) -> pd.DataFrame:
    """A run's eval points of `y`, with `x` (0 at iteration 0, where no train/* metric is logged)."""
    h = run["history"]
    if y not in h:
        return pd.DataFrame(columns=["step", "x", "y"])
    h = h.sort_values("step")
    xs = h[x].where(h.step > 0, 0.0).ffill().fillna(0.0) if x else h.step
    d = pd.DataFrame({"step": h.step, "x": xs, "y": h[y]})
    return d.dropna(subset=["y"])


def _curve(e, x: str, y: str):
    """(x, IQM, low, high) of a sane configuration at its eval points, seeds aligned by eval index."""
    frames = [_evals(r, y, x) for r in e.runs if r["finished"]]
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    n = min(len(f) for f in frames)
    xs = np.mean([f.x.to_numpy(float)[:n] for f in frames], axis=0)
    ys = np.array([f.y.to_numpy(float)[:n] for f in frames])
    iv = np.array([stats.interval(ys[:, j]) for j in range(n)])
    return xs, iv[:, 0], iv[:, 1], iv[:, 2]


def base_value(t, process: str, metric: str) -> float | None:
    """The base model's value (the iteration-0 eval, identical in every run of a process)."""
    v = t.base(process, metric)
    if v is not None:
        return float(v)
    vals = [r["history"].loc[r["history"].step == 0, metric].mean() for e in t.entries if e.row.process == process
            for r in e.runs if metric in r["history"]]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _pad(lo: float, hi: float, frac: float = 0.06) -> tuple[float, float]:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return 0.0, 1.0
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - frac * span, hi + frac * span


def _diverged_label(e) -> str:
    return f"{e.label} (diverged at {e.diverged_at})" if e.row.diverged else f"{e.label} (failed)"


def _legend(fig, handles: dict, y: float = 0.0, ncol: int = 2):
    fh, fl = style.family_handles()
    hs, ls = list(handles.values()) + fh, [textwrap.fill(k, 64, subsequent_indent="  ") for k in handles] + fl
    return style.legend_below(fig, hs, ls, ncol=ncol, y=y)


# ---- sample efficiency ------------------------------------------------------------------------------------
def efficiency(tasks_, out: Path) -> Figure | None:
    """Eval reward (and the selection metric) vs reward queries, NFE and wall-clock."""
    plt = _plt()
    rows = [(t, y) for t in tasks_ for y in dict.fromkeys(["eval/reward_mean", t.metric])
            if any(y in r["history"] for e in t.entries for r in e.runs)]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(style.WIDTH, 2.7 * len(rows)), squeeze=False)
    handles, limits, n_div = {}, {}, set()
    for r, (t, y) in enumerate(rows):
        procs = sorted({e.row.process for e in t.entries})
        for c, (x, xl) in enumerate(X_AXES):
            ax = axes[r][c]
            sx, sy, marks = [0.0], [], []
            for e in t.entries:
                if e.ok:
                    cur = _curve(e, x, y)
                    if cur is None:
                        continue
                    xs, pt, lo, hi = cur
                    (ln,) = ax.plot(xs, pt, **e.style.line())
                    ax.fill_between(xs, lo, hi, color=e.style.color, alpha=0.13, lw=0)
                    handles.setdefault(e.label, ln)
                    sx += list(xs)
                    sy += list(lo) + list(hi)
                    continue
                for run in e.runs:  # each seed of a diverged configuration, up to its divergence
                    d = _evals(run, y, x)
                    if not len(d):
                        continue
                    (ln,) = ax.plot(d.x, d.y, **e.style.line(alpha=0.75, lw=1.1))
                    handles.setdefault(_diverged_label(e), ln)
                    if run["diverged"] is not None:
                        marks.append((float(d.x.iloc[-1]), float(d.y.iloc[-1]), e.style.color))
                        n_div.add(e.label)
                    elif run["finished"]:  # a seed that finished is a sane run: it sets limits too
                        sx += list(d.x)
                        sy += list(d.y)
            for k, p in enumerate(procs):
                b = base_value(t, p, y)
                if b is not None:
                    hb = ax.axhline(b, **style.BASE)
                    handles.setdefault("base model (iteration 0)", hb)
                    if len(procs) > 1:  # one line per process: say which, near the right end, side by side
                        ax.annotate(p, (1, b), xycoords=("axes fraction", "data"), xytext=(-2 - 48 * k, 1),
                                    textcoords="offset points", ha="right", va="bottom", fontsize=style.FONT - 2)
                    sy.append(b)
            xlim = (0.0, max(sx) * 1.03 if max(sx) > 0 else 1.0)
            ylim = _pad(min(sy), max(sy)) if sy else ax.get_ylim()
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            n_off = 0
            for mx, my, col in marks:  # ✕ at the last sane eval; on the frame (with its value) beyond it
                cx, cy = min(max(mx, xlim[0]), xlim[1]), min(max(my, ylim[0]), ylim[1])
                ax.plot(cx, cy, color=col, ls="none", clip_on=False, zorder=5, **style.DIVERGED_MARK)
                if cy != my:  # values on the frame are stacked, so that two never overprint
                    dy = 3 + 9 * n_off
                    n_off += 1
                    ax.annotate(f"{my:.3g} {'↑' if my > cy else '↓'}", (cx, cy), xytext=(6, -dy if my > cy else dy),
                                textcoords="offset points", color=col, fontsize=style.FONT - 1.5,
                                va="top" if my > cy else "bottom", annotation_clip=False)
            limits[f"{t.name}|{y}|{x}"] = (xlim, ylim)
            style.compact_ticks(ax, "x", eng=x != "train/wall_time")
            ax.set_xlabel(xl)
            if c == 0:
                ax.set_ylabel(LABELS.get(y, y))
            ax.set_title(t.name if len(tasks_) > 1 or c == 1 else "", fontsize=style.FONT)
    fig.tight_layout(h_pad=1.2, w_pad=1.0)
    _legend(fig, handles)
    files = style.save(fig, out, "efficiency")
    caption = ("Sample efficiency. Each thick line is one configuration: at every eval the IQM over its seeds of the "
               "eval metric (mean over the pinned eval samples), with its 95 % stratified-bootstrap CI as a band; "
               "seeds are aligned by eval index, x is their mean. Columns: cumulative reward queries, network "
               "evaluations (NFE, training only) and training wall-clock (eval and logging excluded); rows: the eval "
               "reward and the task's selection metric. The dotted black line is the base model (iteration-0 eval; "
               "one per process, named at its right end, when there are two). "
               "Colour and marker identify the method; solid lines with filled markers are zeroth-order methods, "
               "dashed with open markers first-order. Axis limits come from the sane configurations only.")
    if n_div:
        caption += (" Configurations with a diverged seed are drawn per seed (thin lines): a diverged seed up to its "
                    "last logged eval, ending in ✕ (on the frame, with its value, when that lies beyond the axes); "
                    "their legend entries say at which iteration. Their finished seeds count as sane runs for the "
                    "axis limits.")
    return Figure(files, caption, limits)


# ---- reward–KL, reward–diversity ------------------------------------------------------------------------
PAIRS = (("eval/kl_ref", False), ("eval/diversity", True))


def pareto_front(points: np.ndarray, x_higher: bool) -> np.ndarray:
    """Non-dominated points (y higher is better; x higher or lower), sorted by x."""
    p = np.asarray(points, float)
    p = p[np.isfinite(p).all(axis=1)]
    sx = 1 if x_higher else -1
    keep = [i for i in range(len(p)) if not any(
        (sx * p[j, 0] >= sx * p[i, 0]) and (p[j, 1] >= p[i, 1]) and (j != i) and
        ((sx * p[j, 0] > sx * p[i, 0]) or (p[j, 1] > p[i, 1])) for j in range(len(p)))]
    f = p[keep]
    return f[np.argsort(f[:, 0])] if len(f) else f.reshape(0, 2)


def pareto(tasks_, out: Path) -> Figure | None:
    plt = _plt()
    y = "eval/reward_mean"
    panels = [(t, x, xh) for t in tasks_ for x, xh in PAIRS
              if any(x in e.row.intervals and y in e.row.intervals for e in t.entries if e.ok)]
    if not panels:
        return None
    ncol = 2
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(style.WIDTH, 3.6 * nrow), squeeze=False)
    handles, left_out = {}, {}
    for ax, (t, x, xh) in zip(axes.flat, panels):
        pts = []
        for e in t.entries:
            if not e.ok:
                left_out[(t.name, e.label)] = e.status
                continue
            if x not in e.row.intervals or y not in e.row.intervals:
                continue
            (px, xlo, xhi), (py, ylo, yhi) = e.row.intervals[x], e.row.intervals[y]
            h = ax.errorbar(px, py, xerr=[[px - xlo], [xhi - px]], yerr=[[py - ylo], [yhi - py]], capsize=2,
                            elinewidth=1, **e.style.point())
            handles.setdefault(e.label, h)
            pts.append((px, py))
        front = pareto_front(np.array(pts), xh) if pts else np.zeros((0, 2))
        if len(front) > 1:
            (hf,) = ax.plot(front[:, 0], front[:, 1], color="black", ls="--", lw=0.9, zorder=0)
            handles.setdefault("Pareto front", hf)
        procs = sorted({e.row.process for e in t.entries})
        for p in procs:
            bx, by = base_value(t, p, x), base_value(t, p, y)
            if bx is not None and by is not None:
                (hb,) = ax.plot(bx, by, marker="*", ms=11, color="black", ls="none")
                handles.setdefault("base model (iteration 0)", hb)
                if len(procs) > 1:  # one star per process: say which
                    ax.annotate(p, (bx, by), xytext=(7, 0), textcoords="offset points", va="center",
                                fontsize=style.FONT - 1.5)
        outs = [e for e in t.entries if not e.ok]
        n_div, n_fail = sum(1 for e in outs if e.row.diverged), sum(1 for e in outs if not e.row.diverged)
        why = ", ".join(f"{n} {w}" for n, w in ((n_div, "diverged"), (n_fail, "failed")) if n)
        ax.set_title(t.name + (f" ({why} configuration(s) left out, see caption)" if outs else ""))
        ax.set_xlabel(LABELS[x] + (" (higher is better)" if xh else " (lower is better)"))
        ax.set_ylabel("final eval reward")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    _legend(fig, handles)
    files = style.save(fig, out, "pareto")
    caption = ("Final eval reward against the path KL to the reference model (left) and against sample diversity "
               "(right; mean pairwise distance in the reward encoder's features). Each point is one configuration: "
               "the IQM over seeds, with 95 % stratified-bootstrap CIs in both directions; the star is the base model; "
               "the dashed line joins the non-dominated configurations (higher reward and lower KL, or higher "
               "diversity).")
    if left_out:
        caption += " Left out (no final value to place): " + "; ".join(
            f"{lab} on {tn}: {st}" for (tn, lab), st in sorted(left_out.items())) + "."
    return Figure(files, caption)


# ---- rliable: probability of improvement, performance profile ---------------------------------------------
def _scores(tasks_, normalise: bool) -> tuple[dict, dict]:
    """({label: {task: per-seed final selection metric (higher is better)}}, {label: style}) over the
    sane configurations; ``normalise``: (v − base)/(best IQM − base) per task (base of the row's process)."""
    scores, styles = {}, {}
    for t in tasks_:
        sign = 1.0 if t.higher else -1.0
        ok = [e for e in t.entries if e.ok and t.metric in e.row.values and t.metric in e.row.intervals]
        if not ok:
            continue
        best = max(ok, key=lambda e: sign * e.row.intervals[t.metric][0]).row.intervals[t.metric][0]
        for e in ok:
            v = np.asarray(e.row.values[t.metric], float)
            if normalise:
                b = t.base(e.row.process, t.metric)
                if b is None or best == b:
                    continue
                v = (v - b) / (best - b)
            else:
                v = sign * v
            scores.setdefault(e.label, {})[t.name] = v
            styles[e.label] = e.style
    return scores, styles


def _metric_text(tasks_) -> str:
    return ", ".join(f"`{t.metric}` on {t.name}" for t in tasks_)


def improvement(tasks_, out: Path, baseline: str | None = None) -> Figure | None:
    """P(X > baseline) of every sane configuration X, averaged over the tasks both ran."""
    plt = _plt()
    scores, styles = _scores(tasks_, normalise=False)
    if len(scores) < 2:
        return None
    norm, _ = _scores(tasks_, normalise=True)
    rank = {k: np.mean([stats.iqm(v) for v in norm.get(k, {}).values()]) if norm.get(k) else -np.inf for k in scores}
    if baseline is None:
        base = max(rank, key=rank.get)
    else:
        cands = [k for k in scores if k == baseline or k.split(" ")[0] == baseline]
        if not cands:
            raise ReportError(f"--baseline {baseline!r} is neither a configuration nor a method of these runs; "
                              f"choose from {', '.join(sorted(scores))}")
        base = max(cands, key=rank.get)
    res = []
    for k, sx in scores.items():
        common = [tn for tn in sx if tn in scores[base]]
        if k == base or not common:
            continue
        p, lo, hi = stats.probability_of_improvement({tn: sx[tn] for tn in common},
                                                     {tn: scores[base][tn] for tn in common})
        res.append((k, p, lo, hi, len(common)))
    if not res:
        return None
    res.sort(key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(style.WIDTH * 0.8, 0.42 * len(res) + 1.3))
    for j, (k, p, lo, hi, _) in enumerate(res):
        ax.errorbar(p, j, xerr=[[p - lo], [hi - p]], capsize=3, elinewidth=1.4, **styles[k].point())
    ax.axvline(0.5, color="black", ls=":", lw=1)
    ax.set_yticks(range(len(res)), [textwrap.fill(r[0], 48, subsequent_indent="  ") for r in res])
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.6, len(res) - 0.4)
    ax.set_xlabel(f"P(X > Y), Y = {base}")
    ax.grid(axis="y", alpha=0)
    fig.tight_layout()
    files = style.save(fig, out, "probability_of_improvement")
    n_seeds = sorted({len(v) for s in scores.values() for v in s.values()})
    caption = (f"Probability of improvement (rliable): for each sane configuration X, P(X > Y) that a run of X ends "
               f"above a run of Y = {base}" + (" (the best configuration by task-normalised IQM)" if baseline is None
                                               else "") +
               f" on the selection metric ({_metric_text(tasks_)}; final eval), i.e. the Mann–Whitney U statistic "
               "over seed pairs, ties counting ½, averaged over the tasks both ran; bars: 95 % CIs from resampling "
               "X's and Y's seeds independently within each task (stratified independent bootstrap). 0.5 (dotted): "
               "the two cannot be ordered; a CI that contains 0.5 is no evidence either way. "
               f"Seeds per configuration: {', '.join(map(str, n_seeds))}; with n seeds each, P moves in steps of 1/n². "
               "Diverged configurations are not compared.")
    return Figure(files, caption)


def profile(tasks_, out: Path) -> Figure | None:
    """Fraction of runs above τ of the task-normalised selection metric, pooled over tasks, with CIs."""
    plt = _plt()
    scores, styles = _scores(tasks_, normalise=True)
    if not scores:
        return None
    allv = np.concatenate([v for s in scores.values() for v in s.values()])
    lo_tau = max(min(0.0, allv.min()), -1.0)  # below −1 (worse than the base by the best's gain): the left edge
    taus = np.linspace(lo_tau - 0.05, max(1.0, allv.max()) + 0.05, 161)
    fig, ax = plt.subplots(figsize=(style.WIDTH * 0.8, 4.0))
    handles = {}
    for k, s in scores.items():
        prof, lo, hi = stats.performance_profile(s, taus)
        st = styles[k]
        ax.plot(taus, prof, color=st.color, ls=st.ls, lw=1.6, drawstyle="steps-post")
        ax.fill_between(taus, lo, hi, color=st.color, alpha=0.12, lw=0, step="post")
        j = int(np.argmin(np.abs(prof - 0.5)))  # the method's marker where its curve crosses ½
        ax.plot(taus[j], prof[j], **st.point(ms=6))
        handles[k] = ax.plot([], [], **st.line())[0]
    for v, lab, ha in ((0.0, "base model ", "right"), (1.0, " best configuration (IQM)", "left")):
        ax.axvline(v, color="black", ls=":", lw=1)
        ax.text(v, 1.03, lab, ha=ha, va="bottom", fontsize=style.FONT - 1, transform=ax.get_xaxis_transform())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (task-normalised selection metric)")
    ax.set_ylabel("fraction of runs with score > τ")
    fig.tight_layout()
    _legend(fig, handles)
    files = style.save(fig, out, "performance_profile")
    caption = ("Performance profile (rliable): the fraction of a configuration's runs whose final selection metric "
               f"({_metric_text(tasks_)}) exceeds τ, after normalising per task as (score − base model)/(best sane "
               "configuration's IQM − base model), so that 0 is the base model and 1 the best configuration of that "
               "task; runs are pooled over tasks, bands are 95 % stratified-bootstrap CIs. A curve further right is "
               "better; τ starts at −1 (a run more than the best's gain below the base model is left of the frame). "
               "Diverged configurations are left out.")
    return Figure(files, caption)


# ---- sweeps -----------------------------------------------------------------------------------------------
def sweep(tasks_, out: Path) -> Figure | None:
    axes_ = sorted({k for t in tasks_ for e in t.entries for k in e.levels})
    if not axes_:
        return None
    return _heatmap(tasks_, axes_, out) if len(axes_) >= 2 else _levels(tasks_, axes_[0], out)


def _levels(tasks_, axis: str, out: Path) -> Figure:
    """One axis: each level's IQM [95 % CI] of the selection metric, the reward and the KL."""
    plt = _plt()
    panels = [(t, m) for t in tasks_ for m in dict.fromkeys([t.metric, "eval/reward_mean", "eval/kl_ref"])
              if any(m in e.row.intervals for e in t.entries)]
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    n_levels = max(len(t.entries) for t in tasks_)
    fig, axs = plt.subplots(nrow, ncol, figsize=(style.WIDTH, (0.32 * n_levels + 1.2) * nrow), squeeze=False,
                            sharey="row")
    for ax, (t, m) in zip(axs.flat, panels):
        ents = sorted(t.entries, key=lambda e: str(e.levels.get(axis, "")))
        vals = []
        for j, e in enumerate(ents):
            if e.ok and m in e.row.intervals:
                p, lo, hi = e.row.intervals[m]
                ax.errorbar(p, j, xerr=[[p - lo], [hi - p]], capsize=2, **e.style.point())
                vals += [lo, hi]
        lo_, hi_ = _pad(min(vals), max(vals)) if vals else (0, 1)
        for j, e in enumerate(ents):
            if not e.ok:
                ax.text(0.02, j, f"diverged at {e.diverged_at}" if e.row.diverged else "failed", color="tab:red",
                        va="center", fontsize=style.FONT - 1, transform=ax.get_yaxis_transform())
        b = base_value(t, ents[0].row.process, m) if ents else None
        if b is not None:
            ax.axvline(b, **style.BASE)
            vals.append(b)
            lo_, hi_ = _pad(min(vals), max(vals))
        ax.set_xlim(lo_, hi_)
        ax.set_yticks(range(len(ents)), [f"{e.levels[axis]}\n{e.row.method}" if e.levels.get(axis) else
                                        textwrap.fill(e.label, 30) for e in ents])
        ax.set_ylim(-0.6, len(ents) - 0.4)
        ax.set_xlabel(LABELS.get(m, m) + ("" if m != t.metric else " (selection)"))
        ax.set_title(t.name, fontsize=style.FONT)
        style.compact_ticks(ax, "x", 4)
    for ax in list(axs.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    files = style.save(fig, out, "sweep_levels")
    caption = (f"Sweep over `{axis}`: each level (with its method) is one configuration, drawn at the IQM over seeds "
               "of its final eval with the 95 % stratified-bootstrap CI, in the method's colour and marker; the dotted "
               "line is the base model. Diverged levels are written out, not drawn.")
    return Figure(files, caption)


def _heatmap(tasks_, axes_, out: Path) -> Figure:
    """Two or more axes: the selection metric's IQM over the first two (mean over the other levels)."""
    plt = _plt()
    import seaborn as sns

    a0, a1 = axes_[:2]
    fig, axs = plt.subplots(1, len(tasks_), figsize=(min(style.WIDTH, 5.0 * len(tasks_)), 3.6), squeeze=False)
    for ax, t in zip(axs[0], tasks_):
        cells: dict = {}
        for e in t.entries:
            key = (e.levels.get(a0, "–"), e.levels.get(a1, "–"))
            cells.setdefault(key, []).append(e)
        r0, r1 = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
        val = pd.DataFrame(np.nan, index=r0, columns=r1)
        txt = pd.DataFrame("", index=r0, columns=r1)
        for (i, j), es in cells.items():
            ok = [e.row.intervals[t.metric][0] for e in es if e.ok and t.metric in e.row.intervals]
            if len(ok) == len(es) and ok:
                val.loc[i, j] = float(np.mean(ok))
                txt.loc[i, j] = f"{np.mean(ok):.3g}"
            else:
                txt.loc[i, j] = "diverged" if any(e.row.diverged for e in es) else "failed"
        sns.heatmap(val, annot=txt, fmt="", cmap="viridis" if t.higher else "viridis_r", ax=ax, linewidths=0.5,
                    cbar_kws={"label": LABELS.get(t.metric, t.metric)})
        ax.set_xlabel(a1)
        ax.set_ylabel(a0)
        ax.set_title(t.name)
        ax.grid(False)
        ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    files = style.save(fig, out, "sweep_heatmap")
    caption = (f"Sweep: the IQM over seeds of the final selection metric ({_metric_text(tasks_)}) over `{a0}` × `{a1}` "
               "(several configurations in one cell: the mean of their IQMs); yellow is better. Cells with a diverged "
               "configuration say so and carry no colour.")
    return Figure(files, caption)


# ---- original vs RSM ----------------------------------------------------------------------------------------
def original_vs_rsm(tasks_, equiv_path: Path, out: Path) -> Figure | None:
    """Both formulations' curves per method (where both ran), and the equivalence harness's drift."""
    plt = _plt()
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    pairs = []
    for t in tasks_:
        by: dict = {}
        for e in t.entries:
            by.setdefault((e.row.method, e.row.process), []).append(e)
        pairs += [(t, k, es) for k, es in sorted(by.items()) if len({e.row.formulation for e in es}) > 1]
    drift = json.loads(equiv_path.read_text()) if equiv_path.is_file() else []
    drift = [r for r in drift if r.get("offpolicy")]
    if not pairs and not drift:
        return None
    procs = sorted({r["process"] for r in drift})
    n_curve_rows = math.ceil(len(pairs) / 3)
    n_meth = max([sum(1 for r in drift if r["process"] == p) for p in procs] or [0])
    heights = ([2.9 * n_curve_rows + 0.7] if pairs else []) + ([0.24 * n_meth + 1.3] if drift else [])
    fig = plt.figure(figsize=(style.WIDTH, sum(heights)), layout="constrained")
    subs = list(fig.subfigures(len(heights), 1, height_ratios=heights)) if len(heights) > 1 else [fig]
    if pairs:
        sub = subs[0]
        axs = list(sub.subplots(n_curve_rows, 3, squeeze=False).flat)
        for ax, (t, (mid, proc), es) in zip(axs, pairs):
            for e in sorted(es, key=lambda e: e.row.formulation):
                orig = e.row.formulation == "original"
                st = style.row_style(mid, 0 if orig else 1, 2)
                kw = dict(st.line(), ls="-" if orig else ":")
                cur = _curve(e, "train/reward_queries", t.metric) if e.ok else None
                if cur is not None:
                    ax.plot(cur[0], cur[1], **kw)
                    ax.fill_between(cur[0], cur[2], cur[3], color=st.color, alpha=0.13, lw=0)
                else:
                    ax.text(0.5, 0.1 if orig else 0.2, f"{e.row.formulation}: {e.status}", color="tab:red",
                            ha="center", transform=ax.transAxes, fontsize=style.FONT - 1)
            b = base_value(t, proc, t.metric)
            if b is not None:
                ax.axhline(b, **style.BASE)
            ax.set_title(f"{mid} · {proc} · {t.name}", fontsize=style.FONT)
            ax.set_xlabel("reward queries")
            ax.set_ylabel(SHORT.get(t.metric, t.metric))
            style.compact_ticks(ax, "x", 4)
        for ax in axs[len(pairs):]:
            ax.set_axis_off()
        handles = {"original formulation (the authors' loss): solid": Line2D([], [], color="0.3", ls="-", marker="o"),
                   "RSM formulation: dotted, lighter": Line2D([], [], color="0.6", ls=":", marker="o"),
                   "base model (iteration 0)": Line2D([], [], **style.BASE)}
        sub.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3)
    if drift:
        sub = subs[-1]
        axs = sub.subplots(1, len(procs), squeeze=False)[0]
        norm = LogNorm(1e-17, 1e5)
        im = None
        for ax, p in zip(axs, procs):
            recs = sorted((r for r in drift if r["process"] == p), key=lambda r: r["method"])
            ks = sorted({s["step"] for r in recs for s in r["offpolicy"]})
            m = np.full((len(recs), len(ks)), np.nan)
            for i, r in enumerate(recs):
                for s in r["offpolicy"]:
                    m[i, ks.index(s["step"])] = max(float(s["max_rel_err"]), 1e-17)
            im = ax.imshow(m, norm=norm, cmap="RdYlGn_r", aspect="auto")
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.0e}".replace("e-0", "e-").replace("e+0", "e"), ha="center",
                                va="center", fontsize=style.FONT - 2)
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
            ax.set_yticks(range(len(recs)), [r["method"] + (" *" if r.get("kind") not in ("loss", "grad_at_behaviour")
                                                            else "") for r in recs])
            ax.set_xlabel("off-policy Adam steps k on one batch")
            ax.set_title(f"{p}: max relative gradient error", fontsize=style.FONT)
            ax.grid(False)
        cb = sub.colorbar(im, ax=list(axs), shrink=0.9)
        cb.set_label("max rel. error (line: 1e-9)")
        cb.ax.axhline(1e-9, color="black", lw=1.5)
    files = style.save(fig, out, "original_vs_rsm")
    parts = []
    if pairs:
        parts.append("Top: training curves of both formulations of each method that ran with both (the task's "
                     "selection metric vs reward queries, IQM over seeds with 95 % CI; solid: the authors' original "
                     "loss, dotted: the RSM instance; dotted black: the base model).")
    else:
        parts.append("No configuration in these runs was trained with both formulations (each ran one, e.g. a sweep "
                     "with `formulation: rsm`), so there are no paired training curves; `rsmbench bench --task T "
                     "--formulation both` runs them.")
    if drift:
        parts.append(f"Heatmaps: from `{equiv_path.name}` (`make equiv`), the max relative error between the original "
                     "and the RSM parameter gradients after k off-policy Adam steps on the original loss over one "
                     "batch (θ† fixed): at k = 0 the two agree to float64 round-off (green) for the exact kinds; as θ "
                     "leaves θ† the formulations' gradients part (red), which is where equivalence ends. * = an "
                     "approximate kind (not exact even at k = 0).")
    else:
        parts.append("The gradient-drift panel needs `results/equiv.json` (`make equiv`).")
    return Figure(files, " ".join(parts))

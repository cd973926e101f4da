"""`rsmbench report`: paper-style tables and figures from the MLflow store.

    rsmbench report [--task NAME] [--sweep NAME] [--out DIR] [--no-analyses]

Reads the FINISHED runs (one per method × formulation × process × seed; see ``rsmbench.run.bench``)
into pandas and writes ``reports/<name>/`` (name = the sweep, the task, or ``all``):

1. ``table1``: Table 1 regenerated from the method registry, with the max relative gradient
   error of the latest ``rsmbench equiv`` (``results/equiv.json``);
2. ``results_<task>``: final eval reward, KL, diversity, prior preservation and reward queries
   to reach a threshold; mean with a 95 % bootstrap CI over seeds (``rsmbench.analysis.stats``) and the IQM;
   the best value per column in bold;
3. ``efficiency``: eval reward vs reward queries, NFEs and wall-clock, 95 % CI bands over seeds;
4. ``pareto``: reward–KL and reward–diversity fronts;
5. ``influence``: κ(t) and h(t) of every method (``rsmbench.harness.influence``);
6. ``estimator_study``: value-gradient RMSE on ``gmm`` (``rsmbench.harness.estimator_study``); 5 and 6
   depend on the code only, so their data are cached in ``results/`` (delete to recompute);
7. ``sweep_heatmap``: final reward (and J-gap on gmm) over the sweep's first two axes;
8. ``original_vs_rsm``: both formulations' training curves per method, and the off-policy drift
   of their gradients from the equivalence harness.

Tables are written as Markdown and LaTeX (booktabs), figures as PNG and PDF; ``index.md`` links
everything with a caption. An empty store or an unknown task/sweep is one line and exit code 2.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rsmbench.analysis import stats
from rsmbench.core.method import load_all
from rsmbench.errors import ReportError
from rsmbench.harness import estimator_study, influence
from rsmbench.run import paths, tracking

HIST_KEYS = ("eval/reward_mean", "eval/kl_ref", "eval/J_gap", "train/reward_queries", "train/nfe",
             "train/wall_time")
FINAL = {  # column -> (metric, higher is better)
    "reward": ("eval/reward_mean", True), "KL": ("eval/kl_ref", False), "diversity": ("eval/diversity", True),
    "prior FD": ("eval/prior_frechet", False), "J-gap": ("eval/J_gap", False),
}


# ---- loading -------------------------------------------------------------------------------------------
def load_runs(tracker, task: str | None = None, sweep: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history): one row per finished run (tags + final metrics), and its metric history
    (one row per run × logged step, columns = HIST_KEYS)."""
    exps = [e for e in tracker.client.search_experiments() if e.name != "Default"]
    if task is not None:
        names = sorted(e.name for e in exps)
        exps = [e for e in exps if e.name == task]
        if not exps:
            raise ReportError(f"no runs for task {task!r} in the store; tasks with runs: {', '.join(names) or 'none'}")
    flt = "attributes.status = 'FINISHED'" + (f" and tags.sweep = '{sweep}'" if sweep else "")
    rows, hist = [], []
    for e in exps:
        for r in tracker.runs(e.experiment_id, flt):
            t = r.data.tags
            row = {"task": e.name, "run_id": r.info.run_id, "method": t.get("method"),
                   "formulation": t.get("formulation"), "process": t.get("process"),
                   "seed": int(t.get("seed", 0)), "family": t.get("method_family", ""),
                   "sweep": t.get("sweep", "")}
            row.update({k: v for k, v in t.items() if k.startswith("sweep.")})
            row.update(r.data.metrics)
            rows.append(row)
            h = {}
            for key in HIST_KEYS:
                for m in tracker.history(r.info.run_id, key):
                    h.setdefault(m.step, {})[key] = m.value
            hist += [{"run_id": r.info.run_id, "step": s, **v} for s, v in sorted(h.items())]
    if not rows:
        where = f" for sweep {sweep!r}" if sweep else (f" for task {task!r}" if task else "")
        raise ReportError(f"no finished runs{where} in the MLflow store {tracker.uri}; "
                          "run `make bench TASK=...` or `make sweep` first")
    runs = pd.DataFrame(rows)
    history = pd.DataFrame(hist)
    if len(history):
        history = history.merge(runs[["run_id", "task", "method", "formulation", "process", "seed"]], on="run_id")
        history["train/reward_queries"] = history["train/reward_queries"].fillna(0.0)
    return runs, history


# ---- tables ------------------------------------------------------------------------------------------
def _fmt(x, p=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{p}g}"


def markdown_table(df: pd.DataFrame, bold: dict | None = None) -> str:
    bold = bold or {}
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, row in df.iterrows():
        cells = [(f"**{row[c]}**" if bold.get(c) == i else str(row[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex_table(df: pd.DataFrame, caption: str, label: str, bold: dict | None = None) -> str:
    """A booktabs table (no TeX needed to write it; balanced environments are tested)."""
    bold = bold or {}
    esc = lambda s: (str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")  # noqa: E731
                     .replace("&", r"\&").replace("#", r"\#").replace("±", r"$\pm$"))
    cols = list(df.columns)
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}", rf"\label{{{label}}}",
           r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule", " & ".join(esc(c) for c in cols) + r" \\",
           r"\midrule"]
    for i, row in df.iterrows():
        cells = [(rf"\textbf{{{esc(row[c])}}}" if bold.get(c) == i else esc(row[c])) for c in cols]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def table1(equiv_path: Path) -> pd.DataFrame:
    """Table 1 from the registry, plus the latest equivalence errors."""
    errs = {}
    if equiv_path.is_file():
        for rec in json.loads(equiv_path.read_text()):
            errs[rec["method"]] = max(errs.get(rec["method"], 0.0), rec["max_rel_err"])
    rows = []
    for mid, cls in sorted(load_all().items()):
        row = getattr(cls, "table_row", {}) or {}
        rows.append({"method": mid, "order": cls.order, "processes": "/".join(cls.processes),
                     "Ψ̂": row.get("psi", "–"), "γ": row.get("gamma", "–"), "C1": row.get("c1", "–"),
                     "C2": row.get("c2", "–"), "branching": "yes" if row.get("branching") else "no",
                     "current-state": "‡" if row.get("current_state") else "", "kind": cls.kind,
                     "Table 1 row": cls.table1 or "–",
                     "max rel. grad err": _fmt(errs[mid], 2) if mid in errs else "not run"})
    return pd.DataFrame(rows)


def queries_to_threshold(history: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    """Per run: reward queries at the first eval whose reward reaches the task's threshold,
    threshold = base + ½·(best final mean − base) (base = the mean step-0 eval reward)."""
    out = {}
    for task, h in history.dropna(subset=["eval/reward_mean"]).groupby("task"):
        base = h[h.step == 0]["eval/reward_mean"].mean()
        finals = runs[runs.task == task].groupby(["method", "formulation", "process"])["eval/reward_mean"].mean()
        thr = base + 0.5 * (finals.max() - base)
        for rid, g in h.groupby("run_id"):
            hit = g[(g["eval/reward_mean"] >= thr) & (g.step > 0)].sort_values("step")
            out[rid] = hit["train/reward_queries"].iloc[0] if len(hit) else np.nan
    return pd.Series(out, name="queries_to_threshold")


def results_table(runs: pd.DataFrame, task: str) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """(display table, bold positions, numeric summary) for one task."""
    d = runs[runs.task == task]
    cols = {name: m for name, (m, _) in FINAL.items() if m in d}
    cols["queries to threshold"] = "queries_to_threshold"
    num, disp = [], []
    axes = [c for c in d.columns if c.startswith("sweep.") and d[c].notna().any()]
    for key, g in d.groupby(["method", "formulation", "process"] + axes, dropna=False):
        mid, form, proc = key[:3]
        nrow, drow = {"method": mid, "formulation": form, "process": proc}, {"method": mid, "form.": form,
                                                                          "process": proc}
        for a, v in zip(axes, key[3:]):  # sweep levels distinguish runs of the same method
            drow[a.removeprefix("sweep.")] = v if isinstance(v, str) else "–"
        drow["seeds"] = len(g)
        for name, metric in cols.items():
            v = g[metric].dropna().to_numpy(float) if metric in g else np.array([])
            if len(v) == 0:
                nrow[name], drow[name] = np.nan, "–"
                continue
            point, lo, hi = stats.interval(v, "mean")
            nrow[name] = point
            iqm = f" (IQM {_fmt(stats.iqm(v))})" if name == "reward" else ""
            drow[name] = f"{_fmt(point)} [{_fmt(lo)}, {_fmt(hi)}]" + iqm
        num.append(nrow), disp.append(drow)
    num, disp = pd.DataFrame(num), pd.DataFrame(disp)
    bold = {}
    for name in cols:
        if name in num and num[name].notna().any():
            higher = FINAL.get(name, (None, False))[1]
            bold[name] = int(num[name].idxmax() if higher else num[name].idxmin())
    return disp, bold, num


# ---- figures -----------------------------------------------------------------------------------------
def _save(fig, out: Path, stem: str) -> list[str]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{stem}.{ext}", dpi=110)
    plt.close(fig)
    return [f"{stem}.png", f"{stem}.pdf"]


def _label(df: pd.DataFrame) -> pd.Series:
    return df.method + " (" + df.formulation + ", " + df.process + ")"


def efficiency_figure(history: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    h = history.dropna(subset=["eval/reward_mean"]).copy()
    h["run"] = _label(h)
    tasks = sorted(h.task.unique())
    xs = [("train/reward_queries", "reward queries"), ("train/nfe", "network evaluations (NFE)"),
          ("train/wall_time", "training wall-clock (s)")]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.8 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        ht = h[h.task == task]
        for c, (x, xl) in enumerate(xs):
            ax = axes[r][c]
            d = ht.copy()
            d[x] = d[x].fillna(0.0)
            # align seeds on eval index so the CI band is over seeds at matching points
            d["eval_idx"] = d.groupby("run_id").cumcount()
            d["x"] = d.groupby(["run", "eval_idx"])[x].transform("mean")
            sns.lineplot(data=d, x="x", y="eval/reward_mean", hue="run", errorbar=("ci", 95), ax=ax,
                         legend=(c == 2 and r == 0), marker="o", markersize=3)
            ax.set_xlabel(xl)
            ax.set_ylabel("eval reward (mean over eval samples)")
            ax.set_title(f"{task}")
        if r == 0 and axes[r][2].get_legend():
            sns.move_legend(axes[r][2], "upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title=None)
    return _save(fig, out, "efficiency")


def pareto_figure(runs: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    tasks = sorted(runs.task.unique())
    pairs = [("eval/kl_ref", "KL to reference (nats, path sum)", False),
             ("eval/diversity", "diversity (mean pairwise feature distance)", True)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        d = runs[runs.task == task].copy()
        d["run"] = _label(d)
        for c, (x, xl, x_higher) in enumerate(pairs):
            ax = axes[r][c]
            if x not in d or d[x].isna().all():
                ax.text(0.5, 0.5, f"{x} not logged for {task}", ha="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            g = d.groupby("run")[[x, "eval/reward_mean"]].agg(["mean", "std"])
            for name, row in g.iterrows():
                ax.errorbar(row[(x, "mean")], row[("eval/reward_mean", "mean")], xerr=row[(x, "std")],
                            yerr=row[("eval/reward_mean", "std")], fmt="o", ms=4, capsize=2, label=name)
            pts = g[[(x, "mean"), ("eval/reward_mean", "mean")]].to_numpy()
            front = pareto_front(pts, x_higher)
            ax.plot(front[:, 0], front[:, 1], "k--", lw=1, label="Pareto front")
            ax.set_xlabel(xl)
            ax.set_ylabel("final eval reward")
            ax.set_title(task)
            if c == 1:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out, "pareto")


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


def heatmap_figure(runs: pd.DataFrame, out: Path) -> list[str] | None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    axes = [c for c in runs.columns if c.startswith("sweep.")]
    if not axes:
        return None
    rows_ax = axes[0]
    cols_ax = axes[1] if len(axes) > 1 else ("task" if runs.task.nunique() > 1 else "process")
    metrics = [("eval/reward_mean", "final eval reward")] + \
              ([("eval/J_gap", "J-gap (gmm)")] if "eval/J_gap" in runs and runs["eval/J_gap"].notna().any() else [])
    fig, axs = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 0.5 * runs[rows_ax].nunique() + 2.5),
                            squeeze=False)
    for ax, (m, title) in zip(axs[0], metrics):
        piv = runs.pivot_table(index=rows_ax, columns=cols_ax, values=m, aggfunc="mean")
        sns.heatmap(piv, annot=True, fmt=".3g", cmap="viridis", ax=ax, cbar_kws={"label": title})
        ax.set_title(f"{title}, mean over seeds and processes")
        ax.set_xlabel(cols_ax.replace("sweep.", ""))
        ax.set_ylabel(rows_ax.replace("sweep.", ""))
    return _save(fig, out, "sweep_heatmap")


def original_vs_rsm_figure(history: pd.DataFrame, equiv_path: Path, out: Path) -> list[str] | None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    h = history.dropna(subset=["eval/reward_mean"])
    both = h.groupby(["task", "method", "process"]).formulation.nunique()
    keys = [k for k, n in both.items() if n == 2]
    drift = json.loads(equiv_path.read_text()) if equiv_path.is_file() else []
    if not keys and not drift:
        return None
    n = len(keys) + (1 if drift else 0)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, (task, mid, proc) in zip(flat, keys):
        d = h[(h.task == task) & (h.method == mid) & (h.process == proc)]
        sns.lineplot(data=d, x="train/reward_queries", y="eval/reward_mean", hue="formulation", errorbar=("ci", 95),
                     ax=ax, marker="o", markersize=3)
        ax.set_title(f"{mid} · {proc} · {task}", fontsize=9)
        ax.set_xlabel("reward queries")
        ax.set_ylabel("eval reward")
    if drift:
        ax = flat[len(keys)]
        for rec in drift:
            s = rec.get("offpolicy") or []
            if s:
                ax.semilogy([p["step"] for p in s], [max(p["max_rel_err"], 1e-17) for p in s], marker=".",
                            lw=0.8, label=f"{rec['method']} ({rec['process']})")
        ax.axhline(1e-9, color="k", ls=":", lw=0.8, label="float64 tolerance")
        ax.set_xlabel("off-policy Adam steps on the same batch")
        ax.set_ylabel("max rel. gradient error")
        ax.set_title("original vs RSM gradient drift", fontsize=9)
        ax.legend(fontsize=5, ncol=2)
    for ax in flat[n:]:
        ax.set_axis_off()
    return _save(fig, out, "original_vs_rsm")


# ---- the report ------------------------------------------------------------------------------------------
def build(out: Path, task: str | None = None, sweep: str | None = None, analyses: bool = True,
          equiv_path: Path | None = None, cache_dir: Path | None = None) -> Path:
    t0 = time.time()
    root = tracking.results_root()
    equiv_path = equiv_path or root / "equiv.json"
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {uri}; run `make bench TASK=...` or `make sweep` first")
    runs, history = load_runs(tracking.Tracker(), task, sweep)
    runs = runs.join(queries_to_threshold(history, runs), on="run_id") if len(history) else runs
    out.mkdir(parents=True, exist_ok=True)
    idx = [f"# rsmbench report: {sweep or task or 'all tasks'}", "",
           f"{len(runs)} finished runs from `{tracking.tracking_uri()}`; "
           f"tasks: {', '.join(sorted(runs.task.unique()))}.",
           "Intervals are 95 % percentile-bootstrap CIs over seeds (scipy.stats.bootstrap, 2000 resamples); "
           "IQM = interquartile mean over seeds.", ""]

    def add_table(df, stem, caption, bold=None):
        (out / f"{stem}.md").write_text(markdown_table(df, bold))
        (out / f"{stem}.tex").write_text(latex_table(df, caption, f"tab:{stem}", bold))
        idx.extend([f"## {caption}", "", markdown_table(df, bold), f"Files: [{stem}.md]({stem}.md), "
                    f"[{stem}.tex]({stem}.tex)", ""])

    def add_figure(files, title, caption):
        if files:
            idx.extend([f"## {title}", "", f"![{title}]({files[0]})", "", caption, "",
                        "Files: " + ", ".join(f"[{f}]({f})" for f in files), ""])

    add_table(table1(equiv_path), "table1", "Table 1, regenerated from the method registry")
    idx.insert(-1, "Ψ̂, γ, C1, C2 as each method's RSM instance states them (score units; ‡ = current-state "
                   "estimator); the last column is the max relative gradient error of the latest `rsmbench equiv`.")
    for t in sorted(runs.task.unique()):
        disp, bold, _ = results_table(runs, t)
        add_table(disp, f"results_{t}", f"Results on {t}: final eval, mean [95 % CI] over seeds", bold)
    if len(history):
        add_figure(efficiency_figure(history, out), "Sample efficiency",
                   "Eval reward (mean over the pinned eval samples) against cumulative reward queries, network "
                   "evaluations and training wall-clock, one line per method × formulation × process; bands are 95 % "
                   "CIs over seeds at matching eval points (seaborn).")
    add_figure(pareto_figure(runs, out), "Reward–KL and reward–diversity",
               "Final eval reward against the path KL to the reference model and against sample diversity (mean "
               "pairwise distance in the reward encoder's features); points are means over seeds with ±1 std bars; "
               "the dashed line is the Pareto front (higher reward, lower KL / higher diversity).")
    add_figure(heatmap_figure(runs, out), "Sweep heatmap",
               "Final eval reward (and J-gap on gmm) averaged over seeds and processes, over the sweep's first "
               "two axes (or the first axis × task).")
    add_figure(original_vs_rsm_figure(history, equiv_path, out) if len(history) else None, "Original vs RSM",
               "Training curves of the two formulations of each method (eval reward vs reward queries, 95 % CI "
               "over seeds); last panel: max relative error between their parameter gradients after k off-policy "
               "Adam steps on one batch (`rsmbench equiv`), exact at k = 0.")
    if analyses:
        _analyses(out, idx, add_figure, runs, cache_dir or root)
    idx.append(f"Report built in {time.time() - t0:.1f} s.")
    (out / "index.md").write_text("\n".join(idx) + "\n")
    return out / "index.md"


def _analyses(out: Path, idx: list, add_figure, runs: pd.DataFrame, cache_dir: Path) -> None:
    """The h(t) figure (always) and the gmm estimator study (when gmm is reported). Both depend on
    the code, not on the runs: their data are cached in results/ (delete the CSV to recompute)."""
    items = [(influence, "influence", "Temporal influence κ(t), h(t)")]
    if "gmm" in set(runs.task):
        items.append((estimator_study, "estimator_study", "Estimator study on gmm"))
    for module, stem, title in items:
        csv, txt = cache_dir / f"{stem}.csv", cache_dir / f"{stem}.txt"
        if csv.is_file() and txt.is_file():
            df, caption = pd.read_csv(csv), txt.read_text()
            module.plot(df, out)
        else:
            df, caption = module.run(out)
            cache_dir.mkdir(parents=True, exist_ok=True)
            df.to_csv(csv, index=False)
            txt.write_text(caption)
        df.to_csv(out / f"{stem}.csv", index=False)
        add_figure([f"{stem}.png", f"{stem}.pdf"], title, caption + f" Data: [{stem}.csv]({stem}.csv).")


def add_parser(sub):
    p = sub.add_parser("report", help="paper-style tables and figures from the MLflow store")
    p.add_argument("--task", default=None, help="one task (default: every task in the store)")
    p.add_argument("--sweep", default=None, help="only the runs of this sweep")
    p.add_argument("--out", default=None, help="output folder (default: reports/<sweep|task|all>)")
    p.add_argument("--no-analyses", action="store_true", help="skip the h(t) and estimator-study figures")
    p.set_defaults(run=_run)


def _run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out) if args.out else paths.reports_root() / (args.sweep or args.task or "all")
    path = build(out, args.task, args.sweep, analyses=not args.no_analyses)
    print(f"report written to {path}")
    return 0

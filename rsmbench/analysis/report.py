"""`rsmbench report`: paper-style tables and figures from the MLflow store.

    rsmbench report [--task NAME] [--sweep NAME] [--out DIR] [--baseline NAME] [--no-analyses]

Rows are configurations, exactly as in the bench summary (``rsmbench.analysis.summary.collect_rows``):
runs are grouped by the MLflow tag ``config_group`` (the run spec minus its seed), named by the
hyperparameters that differ, and every cell is the IQM over seeds with its 95 % stratified-bootstrap
CI (``rsmbench.analysis.stats.interval``, its defaults), so the summary and the report give the same
intervals for the same runs. A configuration with a diverged seed (status FAILED, tag ``diverged`` =
iteration) is "diverged at iteration k" everywhere: never a number, never bold, never a threshold or
an axis limit. Writes ``reports/<name>/`` (name = the sweep, the task, or ``all``):

1. ``table1``: Table 1 from the method registry with the latest ``rsmbench equiv`` verdicts
   (``results/equiv.json``, ``make equiv``);
2. ``results_<task>``: final eval metrics, reward queries to a threshold, the summary's marks;
3. ``efficiency``: eval metrics vs reward queries, NFE and wall-clock, base-model line;
4. ``pareto``: reward–KL and reward–diversity;
5. ``probability_of_improvement`` and ``performance_profile`` (rliable, across tasks);
6. ``sweep_heatmap`` (two sweep axes) or ``sweep_levels`` (one);
7. ``original_vs_rsm``: both formulations' curves, and the off-policy gradient drift of ``equiv``;
8. ``influence`` and ``estimator_study`` (``rsmbench.harness``): they depend on the code only, so
   their data are cached in ``results/`` (delete the CSV to recompute).

Tables are Markdown and pdflatex-safe LaTeX (``rsmbench.analysis.latex``), figures PNG and PDF in the
suite's method styles (``rsmbench.core.style``); ``index.md`` shows everything with its caption.
An empty store or an unknown task/sweep is one line and exit code 2.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from rsmbench.analysis import figures, latex, stats, summary
from rsmbench.core.method import load_all
from rsmbench.core.style import row_style
from rsmbench.errors import ReportError
from rsmbench.harness import equivalence, estimator_study, influence
from rsmbench.run import paths, tasks, tracking

HIST_KEYS = ("eval/reward_mean", "eval/kl_ref", "eval/J", "eval/J_gap", "eval/diversity", "train/reward_queries",
             "train/nfe", "train/wall_time")
GMM_COLUMNS = ["reward", "KL", "J", "J-gap", "J-gap exact", "SW→p*", "diversity", "prior FD"]
COLUMNS = ["reward", "KL", "diversity", "prior FD"]
EQUIV_HINT = "run `make equiv`"


def log(msg: str) -> None:
    print(f"report: {msg}", file=sys.stderr, flush=True)


# ---- what is reported ---------------------------------------------------------------------------------
@dataclass
class Entry:
    """One configuration of one task: the summary's Row, its label and style, its runs' histories."""
    task: str
    row: summary.Row
    label: str
    style: object
    levels: dict = field(default_factory=dict)  # sweep axis -> level
    runs: list = field(default_factory=list)  # [{run_id, seed, diverged (iteration or None), history}]

    @property
    def ok(self) -> bool:
        return self.row.ok

    @property
    def status(self) -> str:
        return summary.status(self.row)

    @property
    def diverged_at(self) -> str:
        return ", ".join(str(k) for _, k in sorted(self.row.diverged.items()))


@dataclass
class Task:
    name: str
    metric: str  # the selection metric (tasks/<task>.yaml bench.metric)
    higher: bool
    entries: list
    bases: dict  # process -> the base model's iteration-0 values (summary.base_values)

    def base(self, process: str, metric: str) -> float | None:
        b = self.bases.get(process, {})
        return b.get(metric, b.get("eval/J_ref") if metric == "eval/J" else None)


def selection_metric(task: str) -> tuple[str, bool]:
    """(metric, higher is better) of a task's bench section; the eval reward for unknown tasks."""
    try:
        cfg = tasks.load(task)
        return str(cfg.bench.get("metric", "eval/reward_mean")), bool(cfg.bench.get("higher_is_better", True))
    except Exception:  # noqa: BLE001 - a store may hold tasks this checkout does not define
        return "eval/reward_mean", True


def load(tracker, task: str | None = None, sweep: str | None = None) -> list[Task]:
    """Every task of the store (or one) with its configurations; ``sweep``: only that sweep's runs."""
    exps = [e for e in tracker.client.search_experiments() if e.name != "Default"]
    if task is not None:
        names = sorted(e.name for e in exps)
        exps = [e for e in exps if e.name == task]
        if not exps:
            raise ReportError(f"no runs for task {task!r} in the store; tasks with runs: {', '.join(names) or 'none'}")
    out = []
    for e in sorted(exps, key=lambda e: e.name):
        hashes = None
        if sweep is not None:
            hashes = {r.data.tags.get("config_hash") for r in tracker.runs(e.experiment_id, f"tags.sweep = '{sweep}'")}
            if not hashes:
                continue
        rows = [r for r in summary.collect_rows(tracker, e.experiment_id, hashes) if r.runs]
        if not rows:
            continue
        metric, higher = selection_metric(e.name)
        bases = summary.base_values(tracker, rows)
        for proc in sorted({r.process for r in rows}):
            b = bases.get(proc, {})
            base = b.get(metric, b.get("eval/J_ref") if metric == "eval/J" else None)
            summary.mark([r for r in rows if r.process == proc], metric, higher, base)
        out.append(Task(e.name, metric, higher, _entries(e.name, rows), bases))
    if not out:
        where = f" for sweep {sweep!r}" if sweep else (f" for task {task!r}" if task else "")
        raise ReportError(f"no finished runs{where} in the MLflow store {tracker.uri}; "
                          "run `make bench TASK=...` or `make sweep` first")
    return out


def _entries(task: str, rows: list) -> list[Entry]:
    """Entries with their figure labels: the summary's row name, or for a sweep the level and the
    method (plus formulation and process where the task has several), shorter in a legend."""
    per_method: dict = {}
    for r in rows:
        per_method.setdefault(r.method, []).append(r)
    several = len({(r.formulation, r.process) for r in rows}) > 1
    out = []
    for r in rows:
        same = per_method[r.method]
        t = r.runs[0].data.tags
        levels = {k.removeprefix("sweep."): v for k, v in sorted(t.items()) if k.startswith("sweep.")}
        label = r.name
        if levels:
            label = ", ".join(levels.values()) + f" · {r.method}"
            label += f" ({r.formulation}, {r.process})" if several else ""
        out.append(Entry(task, r, label, row_style(r.method, same.index(r), len(same)), levels))
    labels = [e.label for e in out]
    for e in out:
        if labels.count(e.label) > 1:  # not unique: the full row name
            e.label = e.row.name + (" · " + ", ".join(e.levels.values()) if e.levels else "")
    return out


def load_histories(tracker, tasks_: list[Task]) -> None:
    """Each run's history of ``HIST_KEYS`` (one MLflow call per run and key; a progress bar)."""
    items = [(e, run) for t in tasks_ for e in t.entries for run in e.row.runs]
    for e, run in tqdm(items, desc="report: reading metric histories", unit="run", file=sys.stderr,
                       dynamic_ncols=True, mininterval=1.0):
        h: dict = {}
        for key in HIST_KEYS:
            for m in tracker.history(run.info.run_id, key):
                h.setdefault(m.step, {})[key] = m.value
        hist = pd.DataFrame([{"step": s, **v} for s, v in sorted(h.items())], columns=["step", *HIST_KEYS])
        div = run.data.tags.get("diverged")
        e.runs.append({"run_id": run.info.run_id, "seed": int(run.data.tags.get("seed", 0)),
                       "diverged": int(div) if div is not None else None,
                       "finished": run.info.status == "FINISHED", "history": hist})


# ---- tables -------------------------------------------------------------------------------------------
def markdown_table(df: pd.DataFrame, bold: dict | None = None) -> str:
    bold = bold or {}
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, row in df.iterrows():
        cells = [(f"**{row[c]}**" if bold.get(c) == i and str(row[c]) else str(row[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def equivalence_cells(equiv_path: Path) -> tuple[dict, str]:
    """({method: verdict text}, a sentence on where the verdicts come from) from ``rsmbench equiv --json``."""
    if not equiv_path.is_file():
        return {}, (f"`{equiv_path}` is absent: `make equiv` (`rsmbench equiv --json results/equiv.json`, about a "
                    "minute) writes it; rebuild the report to fill the column.")
    recs = json.loads(equiv_path.read_text())
    per: dict = {}
    for rec in recs:
        err = rec.get("max_rel_err", math.nan)
        if rec.get("kind") in equivalence.EXACT:
            verdict = f"{'pass' if rec.get('passed') else 'FAIL'} {err:.1e}"
        else:
            verdict = f"approx. gap {err:.2g}"
        per.setdefault(rec["method"], []).append(f"{rec['process']}: {verdict}")
    mtime = datetime.datetime.fromtimestamp(equiv_path.stat().st_mtime, datetime.timezone.utc)
    when = mtime.strftime("%Y-%m-%d %H:%M UTC")
    dtypes = sorted({r.get("dtype", "float64") for r in recs})
    tol = ", ".join(f"{equivalence.TOL[d]:g} in {d}" for d in dtypes if d in equivalence.TOL)
    return {m: "; ".join(v) for m, v in per.items()}, (
        f"Equivalence verdicts from `{equiv_path.name}` (written {when}, {len(recs)} method × process checks). "
        f"`pass x`: the original loss's and the RSM loss's parameter gradients on one batch, at θ = θ†, agree to a "
        f"max relative error x ≤ {tol} (`loss` kinds also compare the loss values); `FAIL`: they do not; "
        "`approx. gap x`: the method's original is not an exact RSM instance (its `kind` is `approximate`), x is "
        "the gap it reports, which cannot fail.")


def table1(equiv_path: Path) -> tuple[pd.DataFrame, str]:
    """Table 1 from the registry and the latest equivalence verdicts; returns (table, their note)."""
    cells, note = equivalence_cells(equiv_path)
    rows = []
    for mid, cls in sorted(load_all().items()):
        row = getattr(cls, "table_row", {}) or {}
        rows.append({"method": mid, "order": cls.order, "processes": "/".join(cls.processes),
                     "Ψ̂": row.get("psi", "–"), "γ": row.get("gamma", "–"), "C1": row.get("c1", "–"),
                     "C2": row.get("c2", "–"), "branching": "yes" if row.get("branching") else "no",
                     "current-state": "‡" if row.get("current_state") else "", "kind": cls.kind,
                     "Table 1 row": cls.table1 or "–",
                     "equivalence (latest `make equiv`)": cells.get(mid, EQUIV_HINT if not cells else "not checked")})
    return pd.DataFrame(rows), note


def threshold(t: Task, process: str) -> float | None:
    """Halfway from the base model to the best sane configuration's IQM of the selection metric
    (None when no configuration improves on the base)."""
    base = t.base(process, t.metric)
    ok = [e for e in t.entries if e.ok and t.metric in e.row.intervals]
    if base is None or not ok:
        return None
    sign = 1.0 if t.higher else -1.0
    best = max(sign * e.row.intervals[t.metric][0] for e in ok)
    return None if best <= sign * base else sign * (sign * base + 0.5 * (best - sign * base))


def queries_to_threshold(e: Entry, thr: float | None, metric: str, higher: bool) -> list[float]:
    """Per finished seed: reward queries at its first eval after iteration 0 that reaches `thr`
    (nan where none does)."""
    out = []
    for run in e.runs:
        if not run["finished"] or thr is None:
            continue
        h = run["history"].dropna(subset=[metric]) if metric in run["history"] else pd.DataFrame()
        hit = h[(h.step > 0) & ((h[metric] >= thr) if higher else (h[metric] <= thr))] if len(h) else h
        out.append(float(hit.sort_values("step")["train/reward_queries"].iloc[0]) if len(hit) else math.nan)
    return out


def results_table(t: Task) -> tuple[pd.DataFrame, dict, str]:
    """(display table, bold cells, caption) of one task: one row per configuration."""
    gmm = any("eval/J_gap" in e.row.values for e in t.entries)
    cols = [c for c in (GMM_COLUMNS if gmm else COLUMNS)
            if any(summary.COLUMNS[c][0] in e.row.intervals for e in t.entries)]
    levels = sorted({k for e in t.entries for k in e.levels})
    delta = any(e.row.vs_base is not None for e in t.entries)  # the paired change from the base (summary.mark)
    disp, score = [], {c: {} for c in cols}
    for i, e in enumerate(t.entries):
        r = e.row
        n = len(r.seeds) + len(r.diverged) + len(r.failed)
        spent = f"{summary._num(float(np.mean(r.spent)), 0)} ({r.budget})" if r.spent else f"– ({r.budget})"
        d = {"configuration": r.name, **{k: e.levels.get(k, "") for k in levels}, "seeds": str(n),
             "queries (budget)": spent}
        if not e.ok:  # diverged or failed: what happened, in words, and no number
            d.update({c: "" for c in cols})
            d[cols[0] if cols else "status"] = e.status
            d.update({"queries to threshold": "", "marks": ""})
            if delta:
                d["Δ base"] = ""
            disp.append(d)
            continue
        for c in cols:
            metric, _, p = summary.COLUMNS[c]
            d[c] = summary._cell(r, metric, p)
            if metric in r.intervals:
                score[c][i] = r.intervals[metric][0]
        if delta:
            d["Δ base"] = summary.delta_cell(r)
        thr = threshold(t, r.process)
        q = queries_to_threshold(e, thr, t.metric, t.higher)
        reached = [v for v in q if math.isfinite(v)]
        if thr is None or not q:
            d["queries to threshold"] = "–"
        elif len(reached) < len(q):
            d["queries to threshold"] = f"not reached by {len(q) - len(reached)} of {len(q)} seeds"
        else:
            point, lo, hi = stats.interval(reached)
            d["queries to threshold"] = (summary._num(point, 0) if len(reached) < 2 else
                                         f"{summary._num(point, 0)} [{summary._num(lo, 0)}, {summary._num(hi, 0)}]")
            score.setdefault("queries to threshold", {})[i] = point
        d["marks"] = r.marks
        disp.append(d)
    bold = {}
    for c, vals in score.items():  # the one best sane configuration per column (none on a tie)
        if vals:
            higher = summary.COLUMNS[c][1] if c in summary.COLUMNS else False
            best = (max if higher else min)(vals, key=vals.get)
            if sum(v == vals[best] for v in vals.values()) == 1:
                bold[c] = best
    thr_text = ", ".join(f"{p}: {summary._num(v)}" for p in sorted({e.row.process for e in t.entries})
                         if (v := threshold(t, p)) is not None) or "none (no configuration improves on the base)"
    n_div = sum(1 for e in t.entries if e.row.diverged)
    caption = (f"Results on {t.name}: one row per configuration (runs grouped by their spec minus the seed; the "
               "name lists the hyperparameters that differ). Cells: IQM over seeds of the final eval [95 % "
               f"stratified-bootstrap CI] ({stats.RESAMPLES} resamples, as in the bench summary); bold: the best sane "
               f"configuration per column. Queries to threshold: reward queries at the first eval whose `{t.metric}` "
               f"reaches halfway from the base model to the best configuration ({thr_text}). Marks on `{t.metric}`: "
               "best; ≈ best = cannot be told apart from the best at 95 % (probability of improvement); > base = the "
               + ("95 % CI of Δ base clears 0 (< base: it lies below 0; Δ base is the paired change from the base "
                  "model on the same eval samples, its CI over seeds and eval samples: the pigeonhole bootstrap)."
                  if delta else "CI clears the base model.")
               + (f" {n_div} configuration(s) diverged: shown as \"diverged at iteration k\" (of the seeds that "
                  "diverged), not as numbers." if n_div else ""))
    return pd.DataFrame(disp), bold, caption


# ---- the report ---------------------------------------------------------------------------------------
def build(out: Path, task: str | None = None, sweep: str | None = None, analyses: bool = True,
          equiv_path: Path | None = None, cache_dir: Path | None = None, baseline: str | None = None) -> Path:
    t0 = time.time()
    root = tracking.results_root()
    equiv_path = equiv_path or root / "equiv.json"
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {uri}; run `make bench TASK=...` or `make sweep` first")
    tracker = tracking.Tracker()
    log(f"reading runs from {uri}" + (f" (sweep {sweep})" if sweep else ""))
    tasks_ = load(tracker, task, sweep)
    load_histories(tracker, tasks_)
    out.mkdir(parents=True, exist_ok=True)
    entries = [e for t in tasks_ for e in t.entries]
    n_runs = sum(len(e.row.runs) for e in entries)
    n_div = sum(len(e.row.diverged) for e in entries)
    idx = [f"# rsmbench report: {sweep or task or 'all tasks'}", "",
           f"{len(entries)} configurations, {n_runs} runs ({n_div} diverged) from `{uri}`; tasks: "
           f"{', '.join(t.name for t in tasks_)}. Rows are configurations (the run spec minus the seed, MLflow tag "
           f"`{tracking.GROUP_TAG}`). Intervals: IQM over seeds with its 95 % stratified-bootstrap percentile CI "
           f"(`rsmbench.analysis.stats.interval`, {stats.RESAMPLES} resamples), the path of the bench summary. "
           "A configuration with a diverged seed is shown as diverged, never as a number.", ""]
    tex_tables = []

    def add_table(df, stem, caption, bold=None, note="", wrap=None):
        (out / f"{stem}.md").write_text(markdown_table(df, bold))
        tex = latex.table(df, caption, f"tab:{stem}", bold, wrap=wrap, size=r"\scriptsize" if wrap else r"\small")
        (out / f"{stem}.tex").write_text(tex)
        tex_tables.append(tex)
        idx.extend([f"## {caption.split(':')[0]}", "", caption + (" " + note if note else ""), "",
                    markdown_table(df, bold), f"Files: [{stem}.md]({stem}.md), [{stem}.tex]({stem}.tex)", ""])

    def add_figure(fig, title):
        if fig is None:
            return
        log(f"figure {fig.files[0]}")
        idx.extend([f"## {title}", "", f"![{title}]({fig.files[0]})", "", fig.caption, "",
                    "Files: " + ", ".join(f"[{f}]({f})" for f in fig.files), ""])

    log("tables")
    t1, note = table1(equiv_path)
    add_table(t1, "table1", "Table 1 of RSM (arXiv 2604.17415), regenerated from the method registry: each "
              "method's RSM instance (Ψ̂, γ, C1, C2 in score units; ‡ = current-state estimator) and its latest "
              "equivalence check", note=note,
              wrap={"Ψ̂": "3.2cm", "γ": "2.2cm", "C1": "2.4cm", "C2": "1.6cm", "Table 1 row": "2.4cm",
                    "equivalence (latest `make equiv`)": "2.6cm", "processes": "1.3cm"})
    for t in tasks_:
        disp, bold, caption = results_table(t)
        add_table(disp, f"results_{t.name}", caption, bold)
    add_figure(figures.efficiency(tasks_, out), "Sample efficiency")
    add_figure(figures.pareto(tasks_, out), "Reward–KL and reward–diversity")
    add_figure(figures.improvement(tasks_, out, baseline), "Probability of improvement")
    add_figure(figures.profile(tasks_, out), "Performance profile")
    add_figure(figures.sweep(tasks_, out), "Sweep")
    add_figure(figures.original_vs_rsm(tasks_, equiv_path, out), "Original vs RSM")
    if analyses:
        _analyses(out, add_figure, {t.name for t in tasks_}, cache_dir or root)
    (out / "tables.tex").write_text(latex.document(tex_tables))
    idx.append(f"All LaTeX tables in one document: [tables.tex](tables.tex) (pdflatex). "
               f"Report built in {time.time() - t0:.1f} s.")
    (out / "index.md").write_text("\n".join(idx) + "\n")
    return out / "index.md"


def _analyses(out: Path, add_figure, task_names: set, cache_dir: Path) -> None:
    """The h(t) figure (always) and the gmm estimator study (when gmm is reported). Both depend on
    the code, not on the runs: their data (CSV) and run info (JSON) are cached in results/; the
    figure and its caption are redrawn from them by the current code."""
    items = [("influence", "Temporal influence κ(t), h(t)")]
    if "gmm" in task_names:
        items.append(("estimator_study", "Estimator study on gmm"))
    for stem, title in items:
        csv, info_path = cache_dir / f"{stem}.csv", cache_dir / f"{stem}.json"
        if csv.is_file() and info_path.is_file():
            df, info = pd.read_csv(csv), json.loads(info_path.read_text())
        else:
            log(f"computing {stem} (cached in {cache_dir} afterwards; a few minutes)")
            df, info = _compute(stem)
            cache_dir.mkdir(parents=True, exist_ok=True)
            df.to_csv(csv, index=False)
            info_path.write_text(json.dumps(info))
        if stem == "influence":
            influence.plot(df, out)
            caption = influence.CAPTION
        else:
            estimator_study.plot(df, out)
            caption = estimator_study.caption(info)
        df.to_csv(out / f"{stem}.csv", index=False)
        add_figure(figures.Figure([f"{stem}.png", f"{stem}.pdf", f"{stem}.csv"], caption), title)


def _compute(stem: str) -> tuple[pd.DataFrame, dict]:
    if stem == "influence":
        return influence.profiles(), {}
    df, info = estimator_study.study()
    return df, {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()}


def add_parser(sub):
    p = sub.add_parser("report", help="paper-style tables and figures from the MLflow store")
    p.add_argument("--task", default=None, help="one task (default: every task in the store)")
    p.add_argument("--sweep", default=None, help="only the runs of this sweep (default: all runs)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<sweep|task|all>)")
    p.add_argument("--baseline", default=None,
                   help="the configuration (label) or method id the probability of improvement compares with "
                        "(default: the best configuration)")
    p.add_argument("--no-analyses", action="store_true", help="skip the h(t) and estimator-study figures")
    p.set_defaults(run=_run)


def _run(args) -> int:
    out = Path(args.out) if args.out else paths.reports_root() / (args.sweep or args.task or "all")
    path = build(out, args.task, args.sweep, analyses=not args.no_analyses, baseline=args.baseline)
    print(f"report written to {path}")
    return 0


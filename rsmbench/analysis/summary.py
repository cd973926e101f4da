"""The bench summary of a task: one row per configuration, read back from the MLflow store.

Rows are configurations: runs are grouped by their run spec minus the seed (``runspec.group_hash``,
the MLflow tag ``config_group``), so runs that differ in any hyperparameter are separate rows, named
with the values that differ. Each row gives, over its seeds, the IQM and the 95 % stratified-bootstrap
CI (``rsmbench.analysis.stats.interval``, the report's path too) of the final eval metrics, the
reward-query budget and what was spent, and marks

- ``> base``: the lower end of the row's CI of the task's selection metric is above the base model's
  value (the same eval, at iteration 0). Where the runs logged per-sample outcomes (``eval_outcomes.json``;
  shapes), the CI is that of the paired change from the base model over seeds *and* eval samples
  (``stats.paired_difference``, the column ``Δ base``) instead, so a gain that the eval's few samples could
  show by chance is not marked; ``< base`` there: the CI of ``Δ base`` lies on the worse side of 0;
- ``≈ best``: the 95 % CI of the probability that the best row beats this one reaches ½, so the two
  cannot be told apart at these seed counts (the best row itself is marked ``best``).

A configuration with a seed that diverged (left the task's sane range, or turned non-finite) is
reported as "diverged at iteration k" and never as a number, never bold, never compared.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from rsmbench.analysis import stats
from rsmbench.run import tracking
from rsmbench.run.evaluate import ARTIFACTS, OUTCOMES
from rsmbench.run.runspec import config_hash

# column → (metric, higher is better, decimals)
COLUMNS = {
    "reward": ("eval/reward_mean", True, 3), "KL": ("eval/kl_ref", False, 3), "J": ("eval/J", True, 3),
    "J-gap": ("eval/J_gap", False, 3), "J-gap exact": ("eval/J_gap_exact", False, 3),
    "SW→p*": ("eval/sw_to_target", False, 3), "diversity": ("eval/diversity", True, 3),
    "prior FD": ("eval/prior_frechet", False, 3),
}
# a reward's own eval protocol (``eval_metrics``; shapes: GenEval's accuracies), shown when logged
ACCURACY = {"accuracy": "overall", "single": "single_object", "two obj.": "two_object", "counting": "counting",
            "colors": "colors", "position": "position", "attr.": "color_attr"}
COLUMNS.update({c: (f"eval/accuracy/{k}", True, 2) for c, k in ACCURACY.items()})
COLUMNS["audit"] = ("eval/audit/overall", True, 2)  # the same protocol scored by an eval-only detector (shapes)


@dataclass
class Row:
    group: str
    method: str
    formulation: str
    process: str
    name: str = ""
    runs: list = field(default_factory=list)  # MLflow runs (finished or diverged)
    seeds: list = field(default_factory=list)
    diverged: dict = field(default_factory=dict)  # seed -> iteration
    failed: dict = field(default_factory=dict)  # seed -> error (not divergence)
    values: dict = field(default_factory=dict)  # metric -> per-seed final values (finished runs)
    budget: int = 0
    spent: list = field(default_factory=list)
    intervals: dict = field(default_factory=dict)  # metric -> (iqm, low, high)
    outcomes: list = field(default_factory=list)  # per finished seed: its eval_outcomes.json (where logged)
    vs_base: tuple | None = None  # the selection metric's paired change from the base model (point, low, high)
    marks: str = ""

    @property
    def ok(self) -> bool:
        return not self.diverged and not self.failed and bool(self.seeds)


def collect_rows(tracker, experiment_id: str, hashes: set | None = None) -> list[Row]:
    """Rows of the runs of one experiment whose config hash is in `hashes` (all when None)."""
    rows: dict[str, Row] = {}
    for run in tracker.runs(experiment_id):
        t = run.data.tags
        if hashes is not None and t.get("config_hash") not in hashes:
            continue
        if run.info.status not in ("FINISHED", "FAILED"):
            continue
        g = t.get("config_group") or t.get("config_hash")
        row = rows.setdefault(g, Row(group=g, method=t.get("method", "?"), formulation=t.get("formulation", "?"),
                                     process=t.get("process", "?")))
        seed = int(t.get("seed", 0))
        row.runs.append(run)
        row.budget = int(float(run.data.params.get("budget.reward_queries", 0) or 0))
        if "diverged" in t:
            row.diverged[seed] = int(t["diverged"])
        elif run.info.status == "FAILED":
            row.failed[seed] = t.get("error", "failed")
        else:
            row.seeds.append(seed)
            for metric, *_ in COLUMNS.values():
                if metric in run.data.metrics:
                    row.values.setdefault(metric, []).append(run.data.metrics[metric])
            row.spent.append(run.data.metrics.get("train/reward_queries", float("nan")))
            row.outcomes.append(read_outcomes(run))
    out = sorted(rows.values(), key=lambda r: (r.method, r.process, r.formulation, r.group))
    _name_rows(out)
    for r in out:
        if r.ok:
            r.intervals = {m: stats.interval(v) for m, v in r.values.items() if len(v) == len(r.seeds)}
    return out


def read_outcomes(run) -> dict | None:
    """A run's per-sample eval outcomes (``train.save_outcomes``), None where it logged none."""
    uri = urlparse(f"{run.info.artifact_uri}/{ARTIFACTS}/{OUTCOMES}")
    path = Path(unquote(uri.path)) if uri.scheme in ("", "file") else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def paired_vs_base(r: Row, metric: str) -> tuple | None:
    """(point, low, high) of the change of `metric` from iteration 0 to the final eval, paired per eval sample,
    over the row's seeds and eval samples (``stats.paired_difference``); None where a seed logged no outcomes."""
    key = metric.removeprefix("eval/")
    pairs = []
    for o in r.outcomes:
        evals = (o or {}).get("evals", {})
        if "0" not in evals or len(evals) < 2 or key not in evals["0"]:
            return None
        last = evals[max(evals, key=int)]
        pairs.append((last[key], evals["0"][key], o["strata"]))
    if not pairs or any(p[2] != pairs[0][2] for p in pairs):  # the same eval samples for every seed
        return None
    final, base, strata = zip(*pairs)
    return stats.paired_difference(final, base, strata[0])


DERIVED = ("budget.schedule.",)  # params computed from others (the budget's iteration schedule): not in names


def _name_rows(rows: list[Row]) -> None:
    """Name each row by method (formulation, process) and, where several rows share those, the
    hyperparameters that differ between them."""
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r.method, r.formulation, r.process), []).append(r)
    for (m, f, p), rs in by_key.items():
        base = f"{m} ({f}, {p})"
        if len(rs) == 1:
            rs[0].name = base
            continue
        params = [{k: v for k, v in r.runs[0].data.params.items() if k != "seed" and not k.startswith(DERIVED)}
                  for r in rs]
        keys = sorted(k for k in set().union(*params) if len({ps.get(k) for ps in params}) > 1)
        for r, ps in zip(rs, params):
            diff = ", ".join(f"{k.removeprefix('hp.')}={ps.get(k, '–')}" for k in keys[:4])
            r.name = f"{base} [{diff}]" if diff else base


def mark(rows: list[Row], metric: str, higher: bool, base: float | None) -> Row | None:
    """Set ``Row.marks`` (best / ≈ best / > base) for the selection metric; returns the best row."""
    sign = 1.0 if higher else -1.0
    ok = [r for r in rows if r.ok and metric in r.intervals]
    if not ok:
        return None
    best = max(ok, key=lambda r: sign * r.intervals[metric][0])
    for r in ok:
        r.vs_base = paired_vs_base(r, metric)
        if len(r.seeds) < 2 or len(best.seeds) < 2:  # one seed has no interval: nothing can be claimed
            r.marks = "best (1 seed)" if r is best else ""
            continue
        marks = []
        if r is best:
            marks.append("best")
        else:
            _, lo, _ = stats.probability_of_improvement([sign * v for v in best.values[metric]],
                                                        [sign * v for v in r.values[metric]])
            if lo <= 0.5:
                marks.append("≈ best")
        if r.vs_base is not None:  # the paired change, over seeds and eval samples
            _, lo, hi = r.vs_base
            if (lo > 0) if higher else (hi < 0):
                marks.append("> base")
            elif (hi < 0) if higher else (lo > 0):  # fine-tuning made it worse, beyond the eval's sampling
                marks.append("< base")
        elif base is not None:
            _, lo, hi = r.intervals[metric]
            if (lo > base) if higher else (hi < base):
                marks.append("> base")
        r.marks = ", ".join(marks)
    return best


def _num(v: float, p: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{p}f}" if abs(v) < 1e4 else f"{v:.2e}"


def _cell(r: Row, metric: str, p: int) -> str:
    if metric not in r.intervals:
        return "–"
    point, lo, hi = r.intervals[metric]
    return _num(point, p) if len(r.seeds) < 2 else f"{_num(point, p)} [{_num(lo, p)}, {_num(hi, p)}]"


def status(r: Row) -> str:
    """'' for a row of finished seeds, else what happened (diverged at iteration k, failed)."""
    out = []
    if r.diverged:
        its = ", ".join(str(k) for _, k in sorted(r.diverged.items()))
        out.append(f"diverged at iteration {its} ({len(r.diverged)} of {len(r.diverged) + len(r.seeds) + len(r.failed)}"
                   " seeds)")
    if r.failed:
        out.append(f"failed on {len(r.failed)} seed(s): {next(iter(r.failed.values()))[:120]}")
    return "; ".join(out)


def delta_cell(r: Row, p: int = 2) -> str:
    """The row's paired change from the base model, "+0.05 [-0.03, +0.12]" ("–" where not logged)."""
    if r.vs_base is None:
        return "–"
    point, lo, hi = r.vs_base
    return f"{point:+.{p}f} [{lo:+.{p}f}, {hi:+.{p}f}]"


def table(rows: list[Row], columns: list[str]) -> str:
    """The markdown table; a ``Δ base`` column (``delta_cell``) where some row has the paired change."""
    delta = any(r.vs_base is not None for r in rows)
    head = ["configuration", "seeds", "queries (budget)", *columns, *(["Δ base"] if delta else []), "marks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spent = f"{_num(float(np.mean(r.spent)), 0)} ({r.budget})" if r.spent else f"– ({r.budget})"
        n = len(r.seeds) + len(r.diverged) + len(r.failed)
        if not r.ok:
            cells = [r.name, str(n), spent, status(r)] + [""] * (len(columns) - 1 + delta) + [""]
        else:
            cells = ([r.name, str(n), spent] + [_cell(r, COLUMNS[c][0], COLUMNS[c][2]) for c in columns]
                     + ([delta_cell(r)] if delta else []) + [r.marks])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_values(tracker, rows: list[Row]) -> dict:
    """The base model's eval per process, read from a run's iteration-0 eval (every run logs it)."""
    out = {}
    for r in rows:
        if r.process in out or not r.runs:
            continue
        run = r.runs[0]
        vals = {}
        for metric in BASE_SHOWN:
            hist = [m for m in tracker.history(run.info.run_id, metric) if m.step == 0]
            if hist:
                vals[metric] = hist[0].value
        for k, v in run.data.tags.items():  # the task's constants (gmm: J*, floors), tags of every run
            if k.startswith("reference.") and k.removeprefix("reference.") in BASE_CONSTANTS:
                vals["eval/" + k.removeprefix("reference.")] = float(v)
        out[r.process] = vals
    return out


BASE_CONSTANTS = ("J_star_model", "J_star_exact", "gap_ref", "sw_floor_exact", "sw_base_to_mixture")
BASE_SHOWN = ("eval/reward_mean", "eval/J", "eval/diversity", "eval/sw_to_target",
              *(f"eval/accuracy/{k}" for k in ACCURACY.values()), "eval/audit/overall")


def base_text(b: dict) -> str:
    """The base model's reference values in words (gmm: J*, its gap and the SW floors)."""
    parts = [f"reward {_num(b['eval/reward_mean'])}"] if "eval/reward_mean" in b else []
    if "eval/J_star_model" in b:
        parts.append(f"J = J_ref {_num(b.get('eval/J'))}; J* {_num(b['eval/J_star_model'])} (base-model MC), "
                     f"{_num(b.get('eval/J_star_exact'))} (exact mixture); base gap J* − J_ref "
                     f"{_num(b.get('eval/gap_ref'))}")
        parts.append(f"SW→p* {_num(b.get('eval/sw_to_target'))} (exact-vs-exact floor "
                     f"{_num(b.get('eval/sw_floor_exact'))}, base-vs-mixture {_num(b.get('eval/sw_base_to_mixture'))})")
    acc = [f"{k if c == 'accuracy' else c} {b[f'eval/accuracy/{k}']:.2f}" for c, k in ACCURACY.items()
           if f"eval/accuracy/{k}" in b]
    if acc:
        parts.append("accuracy: " + ", ".join(acc))
    if "eval/audit/overall" in b:
        parts.append(f"audit {b['eval/audit/overall']:.2f}")
    if "eval/diversity" in b:
        parts.append(f"diversity {_num(b['eval/diversity'])}")
    return "; ".join(parts)


def write(cfg, specs: list[dict], seconds: float, report_dir: Path) -> tuple[str, Path]:
    """Write ``summary.md`` for the task's runs with the given specs (their config hashes); returns
    (the table, the path)."""
    tracker = tracking.Tracker()
    exp = tracker.experiment(str(cfg.name))
    rows = collect_rows(tracker, exp, {config_hash(s) for s in specs})
    gmm = any("eval/J_gap" in r.values for r in rows)
    columns = ["reward", "KL", "J", "J-gap", "J-gap exact", "SW→p*"] if gmm else ["reward", "KL"]
    if any("eval/accuracy/overall" in r.values for r in rows):  # GenEval-style: overall, then per category
        columns = list(ACCURACY) + ["KL"]
        if any("eval/audit/overall" in r.values for r in rows):
            columns.insert(1, "audit")
    columns += ["diversity", "prior FD"]
    metric, higher = str(cfg.bench.get("metric", "eval/reward_mean")), bool(cfg.bench.get("higher_is_better", True))
    bases = base_values(tracker, rows)
    for proc in sorted({r.process for r in rows}):
        b = bases.get(proc, {})
        base = b.get(metric, b.get("eval/J_ref") if metric == "eval/J" else None)
        mark([r for r in rows if r.process == proc], metric, higher, base)
    text = table(rows, columns)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "summary.md"
    missing = len({config_hash(s) for s in specs}) - sum(len(r.runs) for r in rows)
    base_rule = "the CI is above the base model."
    if any(r.vs_base is not None for r in rows):
        base_rule = (f"the 95 % CI of `Δ base` is above 0 (< base: below 0). `Δ base` is the change of `{metric}` "
                     "from the base model (iteration 0 of the same runs, on the same eval samples), paired per sample, "
                     "with its CI over seeds and eval samples both (the pigeonhole bootstrap, "
                     "rsmbench.analysis.stats.paired_difference).")
    lines = [f"# {cfg.name}: {cfg.get('title', '')}", "",
             f"Profile `{cfg.profile}`. Every run spends its reward-query budget "
             f"({cfg.budget.reward_queries}, {cfg.budget.mode}) within 1 %; eval: {cfg.eval.num_samples} samples, "
             f"seeds from {cfg.eval.seed_start}, sampler {cfg.eval.sampler}. Each row is one configuration; its "
             "cells are the IQM over seeds of the final eval and its 95 % stratified-bootstrap CI. Marks "
             f"(selection metric `{metric}`, within each process: each has its own base model): best; ≈ best = "
             "cannot be told apart from the best at 95 % "
             f"(probability of improvement); > base = {base_rule}", "", text, ""]
    if "audit" in columns:
        lines += ["`audit`: the overall accuracy of the same samples scored by a second detector that no method "
                  "trains on (rewards/shapes.py AUDIT_RECIPE); `accuracy` well above `audit` means the training "
                  "detector is being fooled.", ""]
    for proc, b in sorted(bases.items()):
        lines.append(f"- {proc} base model (iteration 0 of every run): " + base_text(b))
    if bases:
        lines.append("")
    if missing > 0:
        lines += [f"{missing} run(s) of the task's default configuration are not in the store yet "
                  f"(`rsmbench bench --task {cfg.name}` runs them).", ""]
    lines.append(f"{sum(len(r.runs) for r in rows)} runs; this call took {seconds:.1f} s.")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return text, path

"""`rsmbench tune`: one tuning protocol for every method, and the tuned values the bench applies.

    rsmbench tune --task T [--methods a,b] [--seeds N] [--lr-grid x,y,...] [--strength-grid x,y,...]
                  [--workers W] [key=value ...]

For every method (on each process the bench runs it on), a grid of

- the learning rate: the task's ``tune.lr`` values (at least 4, log-spaced), and
- the method's own strength coefficient (``Method.strength``: its KL β, reward scale λ or clip range),
  its current value × the task's ``tune.strength`` factors, unless the task fixes it (an entry under
  the task's ``methods.<id>``, as gmm does for the KL coefficients that target p*),

each run at the bench's matched budget on the tuning seeds ``SEED_OFFSET + k`` (disjoint from the
evaluation seeds 0, 1, … of ``rsmbench bench``). The selection metric is the task's ``bench.metric``
(J on gmm, the final eval reward on the image tasks), averaged over the tuning seeds; a point whose run
diverged on any seed is never selected. The grid is logged to MLflow as one parent run per method with
the grid's runs nested under it. The chosen values go to ``tasks/tuned/<task>.yaml`` with the grid,
the metric, the seeds, the budget, the commit and every point's score and KL; ``rsmbench bench``
applies them by default (``--untuned`` runs the presets), except values the user overrides.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from rsmbench.core import method as registry
from rsmbench.errors import TaskError
from rsmbench.run import tasks

SEED_OFFSET = 1000


def tuned_path(task: str) -> Path:
    return tasks.tasks_dir() / "tuned" / f"{task}.yaml"


def load(task: str) -> dict | None:
    path = tuned_path(task)
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TaskError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None


def tuned_values(cfg, overrides=()) -> dict:
    """{"method/process": {"lr": …, "hp": {…}}} of the task's tuned file (tiny profile only), without
    the values the user set on the command line (``train.lr=…``, ``methods.<id>.<key>=…``)."""
    if cfg.profile != "tiny":
        return {}
    data = load(str(cfg.name)) or {}
    keys = {o.partition("=")[0].strip() for o in overrides or ()}
    out = {}
    for key, sel in (data.get("selected") or {}).items():
        mid = key.split("/")[0]
        v = {"hp": {k: x for k, x in (sel.get("hp") or {}).items() if f"methods.{mid}.{k}" not in keys}}
        if "lr" in sel and "train.lr" not in keys:
            v["lr"] = float(sel["lr"])
        out[key] = v
    return out


def strength_fixed(cfg, m) -> bool:
    """True if the task sets the method's strength coefficient itself (``methods.<id>.<strength>``)."""
    entry = (cfg.get("methods") or {}).get(m.id) or {}
    return not getattr(m, "strength", None) or m.strength in entry


def grid(cfg, m, lr_grid=None, strength_factors=None) -> list[dict]:
    """The grid points {"lr": …, "hp": {…}} of method class `m` on the task."""
    tune = cfg.get("tune") or {}
    lrs = [float(x) for x in (lr_grid or tune.get("lr") or [])]
    if not lrs:
        raise TaskError(f"task {cfg.name!r} has no tune.lr grid; add one or pass --lr-grid")
    points = [{"lr": lr, "hp": {}} for lr in lrs]
    if strength_fixed(cfg, m):
        return points
    base = registry.get(m.id).hparams().get(m.strength)
    factors = [float(x) for x in (strength_factors or tune.get("strength") or [1.0])]
    values = [base * f for f in factors] if base else list(getattr(m, "strength_grid", [base]))
    return [{"lr": p["lr"], "hp": {m.strength: v}} for p in points for v in dict.fromkeys(values)]


def select(scores: dict, higher: bool = True):
    """The grid point (key) with the best mean score over seeds, skipping points with a diverged seed
    (None); returns None when every point diverged."""
    sign = 1.0 if higher else -1.0
    ok = {k: np.mean(v) for k, v in scores.items() if v and all(x is not None for x in v)}
    return max(ok, key=lambda k: sign * ok[k]) if ok else None


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tasks.ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write(cfg, methods_grid: dict, results: dict, selected: dict, seeds: list[int], seconds: float) -> Path:
    """Write the tuned file: protocol, grid, every point's result and the selection."""
    path = tuned_path(str(cfg.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "task": str(cfg.name),
        "protocol": {"metric": str(cfg.bench.get("metric", "eval/reward_mean")),
                     "higher_is_better": bool(cfg.bench.get("higher_is_better", True)),
                     "selection": "mean over the tuning seeds of the final eval; a point with a diverged seed "
                                  "is never selected",
                     "seeds": seeds, "budget_reward_queries": int(cfg.budget.reward_queries),
                     "formulation": str(cfg.bench.get("formulation", "original"))},
        "commit": commit(), "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1),
        "grid": methods_grid, "results": results, "selected": selected,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# written by `rsmbench tune`; applied by `rsmbench bench` (--untuned: the presets)\n"
                   + yaml.safe_dump(data, sort_keys=False, width=110))
    tmp.replace(path)
    return path

"""Where rsmbench reads and writes, whatever the working directory.

``results/`` (the MLflow store, checkpoints, caches), ``reports/`` and ``tasks/`` (task files and
``tasks/sweeps/``) are the repository's folders unless an environment variable names another
folder; a relative value there is relative to the working directory, as a path typed in a shell is.
Paths given on the command line (``--out``, ``--report-dir``, a sweep file) keep their usual meaning.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (an editable install runs from it)

# variable -> (folder in the repository, what it holds); shown by `rsmbench --help`
ENV = {
    "RSMBENCH_RESULTS": ("results", "MLflow store (mlflow.db), artifacts, checkpoints (runs/), equiv.json"),
    "RSMBENCH_REPORTS": ("reports", "bench summaries and `rsmbench report` output"),
    "RSMBENCH_TASKS": ("tasks", "task files <name>.yaml and sweep files sweeps/<name>.yaml"),
}


def _folder(var: str) -> Path:
    value = os.environ.get(var)
    return Path(value).resolve() if value else ROOT / ENV[var][0]


def results_root() -> Path:
    return _folder("RSMBENCH_RESULTS")


def reports_root() -> Path:
    return _folder("RSMBENCH_REPORTS")


def tasks_dir() -> Path:
    return _folder("RSMBENCH_TASKS")


def sweeps_dir() -> Path:
    return tasks_dir() / "sweeps"


def code_fingerprint(parts) -> str:
    """sha256 (16 hex digits) of the Python sources under `parts` (repository folders or files): what
    keys a cache of values that code computes."""
    h = hashlib.sha256()
    for part in parts:
        p = ROOT / part
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def read_cache(name: str) -> dict:
    """``results/cache/<name>`` (JSON), {} when missing or unreadable."""
    try:
        return json.loads((results_root() / "cache" / name).read_text())
    except (OSError, ValueError):
        return {}


def write_cache(name: str, data: dict) -> None:
    """Write ``results/cache/<name>`` atomically (concurrent bench workers); never creates the results
    folder itself (planning a bench writes nothing)."""
    if not results_root().is_dir():
        return
    path = results_root() / "cache" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def help_text() -> str:
    """The environment variables, for the command line's --help."""
    lines = ["environment variables (default: the repository's folder, whatever the working directory):"]
    lines += [f"  {var:<20} {ROOT / folder}: {what}" for var, (folder, what) in ENV.items()]
    lines.append(f"  {'MLFLOW_TRACKING_URI':<20} the MLflow store (default: sqlite:///$RSMBENCH_RESULTS/mlflow.db)")
    return "\n".join(lines)

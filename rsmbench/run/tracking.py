"""MLflow tracking: an embedded sqlite store, safe under several processes writing at once.

Store: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///$RSMBENCH_RESULTS/mlflow.db`` (results root default
``results/``); artifacts under ``$RSMBENCH_RESULTS/artifacts/<experiment>``. One experiment per
task, one run per method × formulation × process × seed, identified by the hash of its fully
resolved config (tag ``config_hash``).

sqlite allows one writer at a time: every client call retries on "database is locked" with a
jittered backoff, the first schema creation is serialised with a file lock, and a run is claimed
with an exclusive per-config file lock (``claim``) so two bench processes never train the same run.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TRANSIENT = ("database is locked", "database table is locked", "busy", "disk i/o error", "unable to open")


def results_root() -> Path:
    return Path(os.environ.get("RSMBENCH_RESULTS", "results")).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_root() / 'mlflow.db'}"


def retry(fn, *args, attempts: int = 60, **kw):
    """Call fn, retrying transient sqlite lock errors (jittered exponential backoff, ≤ ~1 s each)."""
    for k in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - filtered below
            msg = str(e).lower()
            if k == attempts - 1 or not any(t in msg for t in TRANSIENT):
                raise
            time.sleep(min(1.0, 0.02 * 2 ** min(k, 6)) * (0.5 + random.random()))


@contextmanager
def file_lock(path: Path, blocking: bool = True):
    """An exclusive fcntl lock on `path`; yields False (and holds nothing) if non-blocking and busy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def environment_tags() -> dict:
    """git commit and package versions, logged as tags on every run."""
    tags = {}
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        tags["git_commit"] = sha.stdout.strip() or "unknown"
        tags["git_dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
    for pkg in ("torch", "diffusers", "mlflow", "numpy", "omegaconf", "rsmbench"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


class Tracker:
    """A retrying MlflowClient bound to one store."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or tracking_uri()
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            with file_lock(db.with_name(db.name + ".init.lock")):
                self.client = MlflowClient(self.uri)
                retry(self.client.search_experiments, max_results=1)  # creates the schema once
        else:
            self.client = MlflowClient(self.uri)

    def experiment(self, name: str) -> str:
        exp = retry(self.client.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        loc = (results_root() / "artifacts" / name).as_uri()
        try:
            return retry(self.client.create_experiment, name, artifact_location=loc)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "unique" not in str(e).lower():
                raise
            return retry(self.client.get_experiment_by_name, name).experiment_id

    def find_run(self, experiment_id: str, chash: str):
        """The run with this config hash: a FINISHED one if any, else the most recent."""
        runs = retry(self.client.search_runs, [experiment_id], f"tags.config_hash = '{chash}'",
                     max_results=50, order_by=["attributes.start_time DESC"])
        done = [r for r in runs if r.info.status == "FINISHED"]
        return done[0] if done else (runs[0] if runs else None)

    def runs(self, experiment_id: str, filter_string: str = ""):
        return retry(self.client.search_runs, [experiment_id], filter_string, max_results=5000)

    def create_run(self, experiment_id: str, name: str, tags: dict) -> str:
        run = retry(self.client.create_run, experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retry(self.client.log_batch, run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: dict) -> None:
        retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        """All metrics of one step in one batch (one transaction: all or nothing)."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            retry(self.client.log_batch, run_id, metrics=items[i:i + 1000])

    def last_step(self, run_id: str, key: str) -> int:
        hist = retry(self.client.get_metric_history, run_id, key)
        return max((m.step for m in hist), default=-1)

    def history(self, run_id: str, key: str) -> list:
        return sorted(retry(self.client.get_metric_history, run_id, key), key=lambda m: m.step)

    def log_artifact(self, run_id: str, path, artifact_path: str | None = None) -> None:
        retry(self.client.log_artifact, run_id, str(path), artifact_path)

    def get_run(self, run_id: str):
        return retry(self.client.get_run, run_id)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        retry(self.client.set_terminated, run_id, status=status)

    def reopen(self, run_id: str, clear_tags=()) -> None:
        """Mark an interrupted or failed run RUNNING again, dropping the tags of its last failure."""
        for t in clear_tags:
            retry(self.client.delete_tag, run_id, t)
        retry(self.client.update_run, run_id, status="RUNNING")

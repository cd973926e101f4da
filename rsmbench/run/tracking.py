"""MLflow tracking: an embedded sqlite store, safe under several processes writing at once.

Store: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///$RSMBENCH_RESULTS/mlflow.db`` (results root default:
the repository's ``results/``, see ``paths``); artifacts under ``$RSMBENCH_RESULTS/artifacts/<experiment>``.
One experiment per task, one run per method × formulation × process × seed, identified by the hash
of its fully resolved config (tag ``config_hash``); the seeds of one configuration share the tag
``config_group`` (``config_group``).

How the MLflow 3.17 UI shows them:
- The experiment kind: the tag ``mlflow.experimentKind = custom_model_development`` ("Machine
  learning", what the UI itself writes when a user picks that type). In MLflow 3.17.2 the UI does
  not read it to choose the view: with workflow-based navigation on (``shouldEnableWorkflowBasedNavigation``,
  always true in the 3.17.2 build), ``useExperimentKind`` returns the sidebar's GenAI / Model
  training switch, which comes from the URL parameter ``workflowType`` or the browser's
  localStorage (default GenAI). So ``ui_url`` adds ``workflowType=machine_learning``; clicking
  "Model training" in the sidebar once does the same for every later page in that browser.
- Descriptions: the tag ``mlflow.note.content`` on the experiment (the task's title) and on each run.
- The runs table: a saved view (experiment tag ``mlflow.sharedViewState.rsmbench``, listed under
  "Views") with the key metrics as columns, sorted by the final eval reward, grouped by
  ``config_group`` (one row per configuration, metrics averaged over its seeds); ``ui_url``
  opens it (``viewStateShareKey=rsmbench``).

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
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rsmbench.run.paths import results_root
from rsmbench.run.runspec import group_hash

TRANSIENT = ("database is locked", "database table is locked", "busy", "disk i/o error", "unable to open")

KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description MLflow shows on experiment and run pages
GROUP_TAG = "config_group"
VIEW_ID = "rsmbench"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_ID
# the runs table's columns: the final (last logged) value of each metric, with its width in pixels
KEY_METRICS = {"eval/reward_mean": 130, "eval/kl_ref": 100, "eval/J_gap": 100, "train/reward_queries": 150}
FORMULATIONS = {"original": "the authors' loss", "rsm": "its Reward Score Matching instance"}
UI_PORT = 5055  # `make ui`


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


def config_group(config: dict) -> str:
    """What the seeds of one configuration share: ``method-formulation-process`` and the hash of the
    run spec without its seed (``runspec.group_hash``; so sweep levels of one method stay apart)."""
    label = "-".join(str(config[k]) for k in ("method", "formulation", "process") if k in config)
    h = group_hash(config)[:8]
    return f"{label} {h}" if label else h


def method_summary(method) -> str:
    """The first line of a method class's module docstring ("DDPO: denoising diffusion policy ...")."""
    doc = (getattr(sys.modules.get(method.__module__), "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def run_description(config: dict, method=None) -> str:
    """A run's description (``mlflow.note.content``, Markdown): what ran, then what the method is."""
    budget = config.get("budget") or {}
    form = config.get("formulation", "")
    line = (f"**{config.get('method')}**, {form} formulation ({FORMULATIONS.get(form, form)}), "
            f"{config.get('process')} process, seed {config.get('seed')}, "
            f"budget {budget.get('reward_queries')} reward queries ({budget.get('mode')}), "
            f"profile {config.get('profile', 'tiny')}.")
    summary = method_summary(method) if method is not None else ""
    return line + (f"  \n{summary}" if summary else "")  # a line break: the UI folds a second paragraph


def runs_view() -> dict:
    """The saved runs-table view (MLflow 3.17 "Views"): the search facets and UI state that the UI
    merges over its defaults when it opens ``?viewStateShareKey=rsmbench``. Stored as the experiment
    tag ``mlflow.sharedViewState.rsmbench`` = ``{name, createdAt, updatedAt, state}`` with ``state``
    this dict as JSON (plain JSON is accepted beside the UI's deflated form; mlflow 3.17.2
    ``server/js/build/static/js/3448.da9a79ba.chunk.js``, module 53787, and ``3878.0467b2c4.chunk.js``,
    which reads the tag and picks these keys)."""
    metrics = [f"metrics.`{k}`" for k in KEY_METRICS]
    name = "attributes.`Run Name`"  # the grid's column ids are these canonical keys
    return {
        "searchFilter": "", "orderByKey": metrics[0], "orderByAsc": False,
        "selectedColumns": metrics, "columnOrder": [name, *metrics],  # metrics in this order, next to the name
        "columnWidths": {name: 300, **{m: w for m, w in zip(metrics, KEY_METRICS.values())}},
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": GROUP_TAG}]},
        "runsHiddenMode": "SHOW_ALL",  # every group in the charts, not the first 10
    }


def _view_tag(previous: str | None) -> str | None:
    """The saved-view tag value, or None when `previous` already holds this view."""
    state = json.dumps(runs_view(), sort_keys=True)
    try:
        old = json.loads(previous) if previous else None
    except ValueError:
        old = None
    if isinstance(old, dict) and old.get("state") == state:
        return None
    now = int(time.time() * 1000)
    created = old.get("createdAt", now) if isinstance(old, dict) else now
    return json.dumps({"name": "rsmbench: key metrics by configuration", "createdAt": created, "updatedAt": now,
                       "state": state})


def ui_url(experiment_id: str | None = None, port: int = UI_PORT, run_id: str | None = None,
           host: str = "127.0.0.1") -> str:
    """The MLflow UI page of an experiment's runs table (the saved view), of one run, or of the
    experiment list, opened as model training (``workflowType=machine_learning``). The server is
    ``http://host:port`` (``make ui``), or ``MLFLOW_TRACKING_URI`` when that is a tracking server."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    if run_id is not None:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_ID}"


def ui_lines(port: int = UI_PORT) -> list[str]:
    """What `make ui` prints before it starts the server: the experiment list and each experiment's
    runs table. Reads an existing store only (never creates one)."""
    lines = [f"MLflow UI: {ui_url(port=port)}"]
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return lines + [f"  (no store yet at {uri}: run `make bench TASK=gmm` first)"]
    for e in retry(MlflowClient(uri).search_experiments):
        if e.name != "Default":
            lines.append(f"  {e.name}: {ui_url(e.experiment_id, port)}")
    lines.append("  (or click 'Model training' in the sidebar once; the browser remembers it)")
    return lines



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

    def experiment(self, name: str, description: str | None = None) -> str:
        """The id of experiment `name`, created if missing. New and existing experiments get the
        model-training kind and the saved runs view; `description` is set where none is (a
        description edited in the UI is kept)."""
        exp = retry(self.client.get_experiment_by_name, name)
        if exp is None:
            loc = (results_root() / "artifacts" / name).as_uri()
            try:
                retry(self.client.create_experiment, name, artifact_location=loc)
            except MlflowException as e:
                if "already exists" not in str(e).lower() and "unique" not in str(e).lower():
                    raise
            exp = retry(self.client.get_experiment_by_name, name)
        tags = {KIND_TAG: MODEL_TRAINING, VIEW_TAG: _view_tag(exp.tags.get(VIEW_TAG))}
        if description and not exp.tags.get(NOTE_TAG):
            tags[NOTE_TAG] = description
        for key, value in tags.items():
            if value is not None and exp.tags.get(key) != value:
                retry(self.client.set_experiment_tag, exp.experiment_id, key, value)
        return exp.experiment_id

    def find_run(self, experiment_id: str, chash: str):
        """The run with this config hash: a FINISHED one if any, else the most recent."""
        runs = retry(self.client.search_runs, [experiment_id], f"tags.config_hash = '{chash}'",
                     max_results=50, order_by=["attributes.start_time DESC"])
        done = [r for r in runs if r.info.status == "FINISHED"]
        return done[0] if done else (runs[0] if runs else None)

    def runs(self, experiment_id: str, filter_string: str = ""):
        return retry(self.client.search_runs, [experiment_id], filter_string, max_results=5000)

    def create_run(self, experiment_id: str, name: str, tags: dict, description: str | None = None) -> str:
        """A new run; `description` becomes its ``mlflow.note.content`` (see ``run_description``)."""
        tags = {k: str(v) for k, v in tags.items()} | ({NOTE_TAG: description} if description else {})
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

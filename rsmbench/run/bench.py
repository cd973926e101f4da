"""The bench runner: plan every run of a method comparison on a task, then run (or skip, or resume)
them, each into its own MLflow run. The command (``rsmbench bench``) is ``rsmbench.commands.bench``.

A run is method × formulation × process × seed. By default each method runs on the process(es) its
authors' main experiment used (``Method.published_processes``; the task's ``bench.processes:
published``); a list such as ``bench.processes=[flow,diffusion]`` runs each method on every listed
process it supports. The tuned hyperparameters of the task (``tasks/tuned/<task>.yaml``, written by
``rsmbench tune``) are applied unless ``untuned``. Every run of a matched comparison spends the same
reward-query budget within 1 % (``rsmbench.run.budget``).

Every input is validated before anything is written. Runs are matched by the hash of their spec: a
FINISHED one is skipped, an interrupted one resumes from its checkpoint into the same MLflow run, and
a per-run file lock keeps concurrent bench processes from doubling one. A run that diverges (leaves
its task's sane range or turns non-finite) stops with status FAILED and the tag ``diverged`` = its
iteration; being seeded, it would diverge the same way again, so a re-run reports it without
re-running it (``retry_failed`` re-runs it). Runs that failed otherwise (an exception, a kill) are
resumed.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm import tqdm

from rsmbench.core import method as registry
from rsmbench.errors import TaskError, UserError
from rsmbench.run import budget, distributed, fullscale, tasks, tracking, tuning
from rsmbench.run.evaluate import ARTIFACTS
from rsmbench.run.runspec import config_hash, run_name, run_spec
from rsmbench.run.setup import shared_reward
from rsmbench.run.train import Diverged, Overspent, train_run

FORMULATION_CHOICES = ("rsm", "original", "both")


# ---- planning (no side effects) ----------------------------------------------------------------------
def processes(m, task_cfg) -> list[str]:
    """The processes method class m runs on in this task's bench: its published ones (the default
    ``bench.processes: published``) or those of the task's list that it supports."""
    listed = task_cfg.bench.get("processes", "published")
    if listed == "published":
        listed = getattr(m, "published_processes", m.processes)
    return [k for k in listed if k in task_cfg.processes and k in m.processes]


def applies(m, task_cfg, reward) -> str:
    """'' if method class m can run on the task, else why not. A first-order method trains on the task's
    ``reward_first_order`` when it has one (a differentiable form of a black-box reward), else on its reward."""
    if m.order == "first" and task_cfg.get("reward_first_order") is not None:
        reward = shared_reward(task_cfg.reward_first_order)
    if not processes(m, task_cfg):
        listed = task_cfg.bench.get("processes", "published")
        return (f"it supports the {'/'.join(m.processes)} process(es); the task benches "
                f"{listed if isinstance(listed, str) else '/'.join(listed)} of {'/'.join(task_cfg.processes)}")
    if m.order == "first" and not getattr(reward, "differentiable", False):
        return "it is first-order and the task's reward is not differentiable"
    return ""


def check_full_scale(cfg) -> str:
    """The model directory of a full-scale config, or ``fullscale.MissingWeights`` (local lookups only)."""
    return fullscale.check_weights(cfg.fullscale.profile, cfg.get("model"), cfg.reward.name, tasks.reward_kwargs(cfg))


def choose_profile(task: str, overrides) -> tuple[str, str]:
    """(profile, the one line saying why) when --profile is not given: the task's first full-scale
    profile whose weights are present locally, else tiny. A ``model=`` override asks for full scale:
    then missing weights are an error (``fullscale.MissingWeights``), as with an explicit --profile."""
    full = tasks.full_scale_profiles(task)
    if not full:
        return "tiny", f"profile: tiny (task {task!r} has no full-scale profile)"
    wants_full = any(o.partition("=")[0].strip() == "model" for o in overrides or ())
    first_missing = None
    for prof in full:
        cfg = tasks.load(task, overrides, prof)
        try:
            path = check_full_scale(cfg)
        except fullscale.MissingWeights as e:
            first_missing = first_missing or (prof, e)
            continue
        return prof, f"profile: {prof} (weights found: {path})"
    prof, err = first_missing
    if wants_full:
        raise err
    return "tiny", (f"profile: tiny ({prof} weights not found: {err}; pass --profile {prof} model=PATH to use them)")


def plan(args, check: bool = True):
    """Validate everything and return (task_cfg, [run specs with their budget schedules]). Raises
    ``UserError``. Without --profile, sets ``args.profile`` and ``args.profile_note``
    (``choose_profile``). ``args``: task, profile, methods, formulation, seeds, budget, untuned,
    overrides."""
    if getattr(args, "profile", None) is None:
        args.profile, args.profile_note = choose_profile(args.task, args.overrides)
    cfg = tasks.load(args.task, args.overrides, args.profile)
    if args.profile != "tiny":  # weights first: a missing one is one line, before anything is loaded
        check_full_scale(cfg)
    reward = shared_reward(cfg.reward)
    formulation = args.formulation or cfg.bench.get("formulation", "original")
    if formulation not in FORMULATION_CHOICES:
        raise UserError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATION_CHOICES)}")
    seeds = args.seeds if args.seeds is not None else int(cfg.bench.get("seeds", 1))
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    reg = registry.load_all()
    if args.methods in ("all", "", None):
        ids = [i for i in sorted(reg) if not applies(reg[i], cfg, reward)]
    else:
        ids = [i for i in args.methods.split(",") if i]
        for i in ids:
            if i not in reg:
                raise UserError(f"unknown method {i!r}; choose from all, {', '.join(sorted(reg))}")
            why = applies(reg[i], cfg, reward)
            if why:
                raise UserError(f"method {i!r} does not apply to task {cfg.name!r}: {why}")
    forms = ("rsm", "original") if formulation == "both" else (formulation,)
    if cfg.profile == "tiny":  # full scale: the SD model was checked above
        for k in sorted({k for i in ids for k in processes(reg[i], cfg)}):
            tasks.check_base(cfg, k)
    tuned = {} if getattr(args, "untuned", False) else tuning.tuned_values(cfg, args.overrides)
    specs = [run_spec(cfg, i, f, k, s, args.budget, tuned.get(f"{i}/{k}"))
             for i in ids for k in processes(reg[i], cfg) for f in forms for s in seeds_of(cfg, seeds)]
    return cfg, planned(specs, check)


def planned(specs: list[dict], check: bool = True) -> list[dict]:
    """``budget.plan`` of the specs after ``probe``; a budget that buys some run no iteration is a
    one-line ``TaskError`` too."""
    probe(specs)
    out = budget.plan(specs, check)
    for spec in out if check else ():
        sched = spec["budget"].get("schedule")
        if sched is not None and sched["iterations"] < 1:
            raise TaskError(f"budget.reward_queries={spec['budget']['reward_queries']} buys no iteration of "
                            f"{run_name(spec)} ({sched['queries_per_sample']:g} reward queries per sample)")
    return out


def probe(specs: list[dict]) -> None:
    """Run each tiny-profile configuration's first collection and losses, as the budget planner measures
    its cost (``budget.queries_per_sample``, memoised; nothing is written): a configuration that cannot
    run (e.g. a branch schedule longer than the grid) is a one-line ``TaskError`` before any run starts."""
    for spec in specs:
        if spec["profile"] == "tiny":
            try:
                budget.queries_per_sample(spec)  # memoised: budget.plan reuses it
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - the first iteration of this run would fail the same way
                raise TaskError(f"{run_name(spec)} on task {spec['task']!r} cannot run: {type(e).__name__}: "
                                + (str(e).splitlines() or [""])[0]) from None


def seeds_of(cfg, n: int) -> list[int]:
    """The evaluation seeds 0..n−1 (``rsmbench tune`` uses seeds from ``tuning.SEED_OFFSET`` on)."""
    return list(range(n))


# ---- execution -------------------------------------------------------------------------------------------
def execute(runs, progress: bool = True, log=print, retry_failed: bool = False, dist=None,
            experiment: str | None = None, tags: dict | None = None) -> list[dict]:
    """Run (or skip, or resume) every planned run (specs); returns one record per run. `experiment`:
    the MLflow experiment (default: the run's task); `tags`: {config hash: extra tags of a new run}.

    Under a multi-process launch (``dist``: ``distributed.Multi``) every rank walks the same plan: rank
    0 holds the run locks and the MLflow store and tells the others (broadcast) which runs to train;
    all ranks train each of those runs together (``train.train_run``)."""
    dist = dist or distributed.Single()
    log = log if dist.is_main else (lambda *a, **k: None)
    tracker = tracking.Tracker() if dist.is_main else None
    env_tags = tracking.environment_tags() if dist.is_main else {}
    root = tracking.results_root()
    bar = _bar(len(runs), progress and dist.is_main)
    records, deferred = [], list(runs)
    for blocking in (False, True):  # first pass skips runs another process holds; second waits for them
        todo, deferred = deferred, []
        for rc in todo:
            chash = config_hash(rc)
            lock = tracking.file_lock(root / "locks" / f"{chash}.lock", blocking=blocking) if dist.is_main \
                else contextlib.nullcontext(True)
            with lock as got:
                if not dist.broadcast(got):
                    deferred.append(rc)
                    continue
                rec = _open_run(tracker, rc, chash, {**env_tags, **(tags or {}).get(chash, {})}, root, bar, log,
                                retry_failed, experiment) if dist.is_main else None
                rec = dist.broadcast(rec)
                if rec["status"] in ("new", "resumed"):
                    _train(tracker, rec, root / "runs" / chash, bar, log, dist)
                records.append(rec)
                bar.update(1)
    bar.close()
    order = {config_hash(rc): k for k, rc in enumerate(runs)}
    return sorted(records, key=lambda r: order[r["config_hash"]])


def execute_parallel(runs, workers: int, progress: bool = True, log=print, retry_failed: bool = False,
                     experiment: str | None = None, tags: dict | None = None) -> list[dict]:
    """``execute`` over `workers` processes (spawned, one torch thread each): runs are independent, the
    per-run locks and the sqlite store are safe under concurrent writers."""
    if workers <= 1 or len(runs) <= 1:
        return execute(runs, progress, log, retry_failed, experiment=experiment, tags=tags)
    order = {config_hash(rc): k for k, rc in enumerate(runs)}
    tracker, records, todo = tracking.Tracker(), [], []
    for rc in runs:  # runs done before are answered here: a re-run that skips everything spawns nothing
        rec = _previous(tracker, rc, config_hash(rc), _NoBar(), log, retry_failed, experiment)
        (records.append(rec) if rec else todo.append(rc))
    if not todo:
        return sorted(records, key=lambda r: order[r["config_hash"]])
    bar = _bar(len(runs), progress)
    bar.update(len(records))
    bar.set_postfix_str(f"{len(records)} done before, skipped; starting {min(workers, len(todo))} worker "
                        "processes (importing torch takes a few seconds)")
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as ex:
        futures = [ex.submit(execute, [rc], False, _quiet, retry_failed, None, experiment, tags) for rc in todo]
        for f in as_completed(futures):
            (rec,) = f.result()
            if rec["status"] in ("failed", "diverged"):
                log(f"{rec['status'].upper()} {rec['name']}: {rec.get('error', '')}", file=sys.stderr)
            records.append(rec)
            bar.set_postfix_str(f"{rec['name']}: {rec['status']}")
            bar.update(1)
    bar.close()
    return sorted(records, key=lambda r: order[r["config_hash"]])


def _quiet(*a, **k):
    pass


def _previous(tracker, rc, chash, bar, log, retry_failed=False, experiment=None) -> dict | None:
    """The record of a run that is not to be trained again: skipped (FINISHED before) or diverged before
    (not retried); None otherwise."""
    name = run_name(rc)
    rec = {"config_hash": chash, "rc": rc, "name": name}
    prev = tracker.find_run(tracker.experiment(experiment or rc["task"]), chash)
    if prev is not None and prev.info.status == "FINISHED":
        rec.update(run_id=prev.info.run_id, status="skipped")
        bar.set_postfix_str(f"{name}: done, skipped")
        return rec
    if prev is not None and "diverged" in prev.data.tags and not retry_failed:
        err = prev.data.tags.get("error", "diverged")
        log(f"DIVERGED {name} (earlier run, not re-run; --retry-failed re-runs it): {err}", file=sys.stderr)
        rec.update(run_id=prev.info.run_id, status="diverged", error=err, diverged=int(prev.data.tags["diverged"]))
        return rec
    return None


def _open_run(tracker, rc, chash, env_tags, root, bar, log, retry_failed=False, experiment=None) -> dict:
    """Rank 0: the record of a planned run: skipped (FINISHED before), failed (stopped on a NaN before,
    not retried), resumed (its MLflow run reopened) or new (an MLflow run created, its spec logged)."""
    rec = _previous(tracker, rc, chash, bar, log, retry_failed, experiment)
    if rec is not None:
        return rec
    name = run_name(rc)
    rec = {"config_hash": chash, "rc": rc, "name": name}
    exp = tracker.experiment(experiment or rc["task"])
    prev = tracker.find_run(exp, chash)
    m = registry.get(rc["method"])
    ckpt = root / "runs" / chash
    if prev is not None:
        rec.update(run_id=prev.info.run_id, status="resumed")
        tracker.reopen(prev.info.run_id,
                       clear_tags=[t for t in ("error", "traceback", "diverged") if t in prev.data.tags])
        return rec
    tags = {"config_hash": chash, tracking.GROUP_TAG: tracking.config_group(rc), "method": rc["method"],
            "formulation": rc["formulation"],
            "process": rc["process"], "seed": rc["seed"], "profile": rc["profile"], "task": rc["task"],
            "method_family": f"{m.order}-order", "table1": m.table1 or "",
            "equivalence_kind": m.equivalence_kind(rc["hp"])[0],
            "paper": m.paper or "", "budget_mode": rc["budget"]["mode"], "tuned": str(bool(rc.get("tuned"))).lower(),
            **env_tags}
    run_id = tracker.create_run(exp, name, tags, description=tracking.run_description(rc, m))
    tracker.log_params(run_id, tracking.flatten(rc))
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(rc, indent=1, sort_keys=True, default=str))
    tracker.log_artifact(run_id, ckpt / "config.json")
    rec.update(run_id=run_id, status="new")
    return rec


def _train(tracker, rec, ckpt, bar, log, dist) -> None:
    """Train a new or resumed run to its budget (every rank); rank 0 logs and closes its MLflow run.
    A failure is recorded in ``rec`` (status failed, error) and does not stop the bench."""
    rc, run_id, name = rec["rc"], rec["run_id"], rec["name"]
    last = {"step": tracker.last_step(run_id, "iteration") if dist.is_main else 0}

    def log_metrics(metrics, step):
        if step > last["step"]:
            tracker.log_metrics(run_id, metrics, step)
            evals = {f"vs_queries/{k.removeprefix('eval/')}": v for k, v in metrics.items() if k.startswith("eval/")}
            if evals:  # the eval series again against cumulative reward queries: MLflow's charts at equal compute
                tracker.log_metrics(run_id, evals, int(metrics.get("train/reward_queries", 0)))
            last["step"] = step

    def on_iteration(it, metrics):
        bar.set_postfix_str(f"{name} it {it} r {metrics['train/reward_mean']:.3f} "
                            f"q {int(metrics['train/reward_queries'])}/{rc['budget']['reward_queries']}")

    def log_artifact(path):
        tracker.log_artifact(run_id, path, ARTIFACTS)

    def log_reference(values):  # constants of the task (gmm: J*, floors): tags, not metric series
        tracker.set_tags(run_id, {f"reference.{k}": f"{v:.6g}" for k, v in values.items()})

    try:
        res = train_run(rc, log_metrics, log_artifact, ckpt, on_iteration, dist=dist, log_reference=log_reference)
    except Diverged as e:
        log(f"DIVERGED {name}: {e}", file=sys.stderr)
        if dist.is_main:
            tracker.set_tags(run_id, {"error": str(e), "diverged": e.iteration})
            tracker.finish(run_id, "FAILED")
        rec.update(status="diverged", error=str(e), diverged=e.iteration)
        return
    except Exception as e:  # noqa: BLE001 - one broken method must not stop the bench
        if isinstance(e, Overspent):  # found at the end, after the last checkpoint: a re-run starts afresh
            (ckpt / "state.pt").unlink(missing_ok=True)
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"FAILED {name}: {line}", file=sys.stderr)
        if dist.is_main:
            tracker.set_tags(run_id, {"error": line[:5000], "traceback": traceback.format_exc()[-5000:]})
            tracker.finish(run_id, "FAILED")
        rec.update(status="failed", error=line)
        return
    if dist.is_main:
        tracker.finish(run_id, "FINISHED")
    rec["iterations"] = res.iterations


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _bar(total: int, progress: bool):
    if not progress:
        return _NoBar()
    return tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True, file=sys.stderr)

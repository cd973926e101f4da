"""`rsmbench sweep FILE`: the Cartesian product of design-space axes, one MLflow run per point.

    rsmbench sweep tasks/sweeps/NAME.yaml [--workers N] [--launcher local|ray] [--ray-address A]
                   [--tasks T1,T2] [--dry-run]

A sweep file (omegaconf YAML, kept in ``tasks/sweeps/``):

    name: estimators
    tasks: [gmm]                     # task axis
    seeds: [0, 1]                    # seed axis
    formulation: rsm                 # or original / both
    overrides: [budget.reward_queries=1920]   # task-config dotlist applied to every point
    axes:                            # each axis: level name -> what the level sets
      estimator:
        fo_terminal: {method: rsm_fo}
        zo_no_cv:    {method: reinforce_kl, hp: {baseline: none}}
      temporal:
        own: {}
        snr_half: {hp: {temporal: snr, temporal_power: 0.5}}

Exactly one axis level per point names the method; ``preset: NAME`` (or ``first``) merges one
of the method's published presets; ``hp`` entries of all levels are merged into
that method's hyperparameters; ``overrides`` entries are task-config dotlists. A point runs on
every process the task benches that the method supports. A point that cannot run (method not
applicable to the task's process, first-order method on a black-box reward, unknown method or
hyperparameter value) is reported at ``--dry-run`` and skipped with its reason, never crashes the
sweep. Each run is tagged ``sweep`` and ``sweep.<axis>`` = level, and finished points are skipped
on re-run (the bench's config-hash matching), so an interrupted sweep resumes.

Launchers: ``local`` runs points in parallel worker processes (at most the number of cores);
``ray`` submits each point as a Ray task asking for ``--cpus-per-point`` CPUs on an existing
cluster (``ray.init(address=...)``; MLFLOW_TRACKING_URI must then name a tracking server every
node can reach). No scheduler of our own: Ray and concurrent.futures do the scheduling.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rsmbench.core import method as registry
from rsmbench.core.checkpoints import load_checkpoint
from rsmbench.core.design import TEMPORAL
from rsmbench.errors import CheckpointError, SweepError, UserError
from rsmbench.run import bench, paths, tasks, tracking
from rsmbench.run.bench import applies
from rsmbench.run.runspec import run_spec


@dataclass
class Point:
    task: str
    method: str | None
    process: str | None
    seed: int
    formulation: str
    levels: dict  # axis -> level name
    hp: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    skip: str = ""  # why this point cannot run ('' = valid)
    budget: int = 0

    @property
    def label(self) -> str:
        lv = ",".join(f"{a}={v}" for a, v in self.levels.items())
        return f"{self.task}/{self.method}/{self.process}/{self.formulation}/s{self.seed} [{lv}]"


def load(path) -> dict:
    p = Path(path)
    if not p.is_file() and (paths.sweeps_dir() / f"{path}.yaml").is_file():  # a shipped sweep's name
        p = paths.sweeps_dir() / f"{path}.yaml"
    if not p.is_file():
        sweeps = sorted(str(q) for q in paths.sweeps_dir().glob("*.yaml"))
        raise SweepError(f"no sweep file {str(path)!r}; the shipped sweeps (also by name) are: {', '.join(sweeps)}")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as e:  # noqa: BLE001 - any YAML/omegaconf error is the user's file
        raise SweepError(f"{path}: malformed sweep file: {str(e).splitlines()[0]}") from None
    for key in ("name", "tasks", "axes"):
        if key not in cfg:
            raise SweepError(f"{path}: missing required key {key!r}")
    if not isinstance(cfg["axes"], dict) or not all(isinstance(v, dict) and v for v in cfg["axes"].values()):
        raise SweepError(f"{path}: 'axes' must map each axis name to a non-empty mapping of levels")
    cfg.setdefault("seeds", [0])
    cfg.setdefault("formulation", "rsm")
    cfg.setdefault("overrides", [])
    cfg.setdefault("profile", "tiny")
    if cfg["formulation"] not in ("rsm", "original", "both"):
        raise SweepError(f"{path}: formulation must be rsm, original or both, got {cfg['formulation']!r}")
    return cfg


def expand(cfg: dict) -> list[Point]:
    """Every point of tasks × axis levels × seeds × (processes, formulations), validated."""
    reg = registry.load_all()
    axes = list(cfg["axes"].items())
    forms = ("rsm", "original") if cfg["formulation"] == "both" else (cfg["formulation"],)
    points = []
    task_cache = {}
    for task in cfg["tasks"]:
        if task not in task_cache:
            try:
                tc = tasks.load(task, cfg["overrides"], cfg["profile"])
                task_cache[task] = (tc, tasks.build_reward(tc), None)
            except tasks.TaskError as e:
                task_cache[task] = (None, None, str(e))
        tc, reward, terr = task_cache[task]
        for combo in itertools.product(*[list(levels.items()) for _, levels in axes]):
            levels = {name: lv for (name, _), (lv, _) in zip(axes, combo)}
            specs = [spec or {} for _, spec in combo]
            methods = [s["method"] for s in specs if "method" in s]
            presets = [s["preset"] for s in specs if "preset" in s]
            hp = {k: v for s in specs for k, v in (s.get("hp") or {}).items()}
            overrides = [o for s in specs for o in (s.get("overrides") or [])]
            base = dict(task=task, levels=levels, hp=hp, overrides=overrides)
            why = terr or ("" if len(methods) == 1 else f"{len(methods)} axis levels name a method (need one)")
            mid = methods[0] if len(methods) == 1 else None
            if not why and mid not in reg:
                why = f"unknown method {mid!r}"
            if not why and presets:
                why, hp = _with_preset(reg[mid], presets[0], hp)
            procs = [None]
            if not why:
                why = applies(reg[mid], tc, reward)
                kinds = [k for k in tc.bench.processes if k in tc.processes]
                procs = [k for k in kinds if k in reg[mid].processes] or [None]
                why = why or next((e for e in (_checkpoint_error(tc, k) for k in procs if k) if e), "")
            for proc in procs:
                for seed in cfg["seeds"]:
                    for form in forms:
                        pt = Point(method=mid, process=proc, seed=int(seed), formulation=form, skip=why, **base)
                        if not why:
                            pt.skip, pt.budget = _validate(pt, cfg)
                        points.append(pt)
    return points


def _checkpoint_error(tc, kind: str) -> str:
    try:
        load_checkpoint(tasks.resolve_path(tc.processes[kind].model.checkpoint), task=tc.name)
    except CheckpointError as e:
        return str(e)
    return ""


def _with_preset(m, name: str, hp: dict) -> tuple[str, dict]:
    """Merge a method preset (``first`` = its first listed one) under the level's hp."""
    if not m.presets:
        return f"{m.id} has no published preset", hp
    name = next(iter(m.presets)) if name == "first" else name
    if name not in m.presets:
        return f"{m.id} has no preset {name!r}", hp
    return "", {**{k: v for k, v in m.presets[name].items() if k != "source"}, **hp}


def _task_cfg(pt: Point, cfg: dict):
    tc = tasks.load(pt.task, list(cfg["overrides"]) + list(pt.overrides), cfg["profile"])
    if pt.hp:
        tc = OmegaConf.merge(tc, {"methods": {pt.method: pt.hp}})
    return tc


def run_config(pt: Point, cfg: dict):
    tc = _task_cfg(pt, cfg)
    rc = run_spec(tc, pt.method, pt.formulation, pt.process, pt.seed)
    rc["sweep"] = {"name": cfg["name"], **pt.levels}
    return tc, rc


def _validate(pt: Point, cfg: dict) -> tuple[str, int]:
    """('' or the reason the point cannot run, its reward-query budget)."""
    try:
        _, rc = run_config(pt, cfg)
    except (ValueError, KeyError) as e:
        return f"bad configuration: {str(e).splitlines()[0]}", 0
    if pt.hp.get("temporal", "own") not in TEMPORAL:
        return f"unknown temporal profile {pt.hp['temporal']!r}", 0
    if pt.formulation == "original" and (pt.hp.get("temporal", "own") != "own" or pt.hp.get("trust_c2")):
        return "temporal/trust_c2 knobs act on the RSM formulation only", 0
    return "", int(rc["budget"]["reward_queries"])


def run_point(pt: Point, cfg: dict, threads: int = 1) -> dict:
    """Run one point (in a worker process or a Ray task); returns its record."""
    torch.set_num_threads(max(1, threads))
    _, rc = run_config(pt, cfg)
    recs = bench.execute([rc], progress=False, log=lambda *a, **k: None)
    rec = recs[0]
    if "run_id" in rec:
        tracking.Tracker().set_tags(rec["run_id"], {"sweep": cfg["name"],
                                                    **{f"sweep.{a}": v for a, v in pt.levels.items()}})
    return {"label": pt.label, "status": rec.get("status"), "run_id": rec.get("run_id"), "error": rec.get("error")}


def _launch_local(points, cfg, workers: int):
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        for pt in points:
            yield run_point(pt, cfg, threads)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(run_point, pt, cfg, threads) for pt in points]
        for f in as_completed(futs):
            yield f.result()


def _launch_ray(points, cfg, address: str | None, cpus: int):
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus)(run_point)
    pending = [remote.remote(pt, cfg, cpus) for pt in points]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def dry_run_table(points: list[Point]) -> str:
    valid = [p for p in points if not p.skip]
    lines = [f"{'#':>4}  {'point':<90} status"]
    for k, p in enumerate(points):
        lines.append(f"{k:>4}  {p.label:<90} " + ("run" if not p.skip else f"skip: {p.skip}"))
    lines.append(f"{len(valid)} runs to do ({len(points) - len(valid)} skipped), "
                 f"estimated budget {sum(p.budget for p in valid)} reward queries")
    return "\n".join(lines)


def add_parser(sub):
    p = sub.add_parser("sweep", help="run the Cartesian product of a sweep file's axes (MLflow run per point)")
    p.add_argument("file", help="a sweep YAML file, or the name of a shipped sweep (rsmbench list sweeps)")
    p.add_argument("--workers", type=int, default=1, help="parallel points (local launcher; ≤ cores; default: 1)")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="run the points in local processes or as Ray tasks (default: local)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start/attach locally)")
    p.add_argument("--cpus-per-point", type=int, default=1, help="CPUs each Ray task asks for (default: 1)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the file's tasks (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the points and the budget; run nothing")
    p.set_defaults(run=_run)


def _run(args) -> int:
    cfg = load(args.file)
    if args.tasks:
        keep = [t for t in args.tasks.split(",") if t]
        bad = [t for t in keep if t not in cfg["tasks"]]
        if bad:
            raise SweepError(f"--tasks {','.join(bad)} not in the sweep's tasks ({', '.join(cfg['tasks'])})")
        cfg["tasks"] = keep
    points = expand(cfg)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    print(dry_run_table(points) if args.dry_run else
          f"sweep {cfg['name']}: {sum(not p.skip for p in points)} runs, "
          f"{sum(bool(p.skip) for p in points)} skipped (see --dry-run)")
    if args.dry_run:
        return 0
    todo = [p for p in points if not p.skip]
    workers = min(args.workers, os.cpu_count() or 1, max(1, len(todo)))
    t0, failed = time.time(), 0
    it = _launch_ray(todo, cfg, args.ray_address, args.cpus_per_point) if args.launcher == "ray" \
        else _launch_local(todo, cfg, workers)
    for rec in it:
        failed += rec["status"] == "failed"
        print(f"{rec['status']:>8}  {rec['label']}" + (f"  ({rec['error']})" if rec.get("error") else ""),
              flush=True)
    print(f"sweep {cfg['name']}: {len(todo)} points in {time.time() - t0:.1f} s, {failed} failed", file=sys.stderr)
    return 1 if failed else 0

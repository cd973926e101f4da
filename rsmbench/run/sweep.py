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
applicable to the task's processes, first-order method on a black-box reward, a design knob on the
original formulation) is reported at ``--dry-run`` and skipped with its reason. A mistake in the
file is an error before anything runs (one line, exit 2): an unknown key, task, method or preset, a
hyperparameter the method does not declare or a value outside its range, a bad override; and each
point's configuration runs its first collection (``bench.probe``) before the sweep starts. Each run
is tagged ``sweep`` and ``sweep.<axis>`` = level, and finished points are skipped on re-run (the
bench's config-hash matching), so an interrupted sweep resumes.

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
from rsmbench.core.params import Param, check_keys, did_you_mean
from rsmbench.errors import CheckpointError, SweepError, TaskError, UserError
from rsmbench.run import bench, budget, paths, tasks, tracking
from rsmbench.run.bench import applies
from rsmbench.run.runspec import run_spec

# What a sweep file and each of its axis levels may set (``load`` checks names and types).
FILE = {"name": Param("", type=str), "tasks": Param([], items=Param("", type=str)),
        "axes": Param({}, type=dict), "seeds": Param([0], items=Param(0, ge=0)),
        "formulation": Param("rsm", choices=("rsm", "original", "both")),
        "overrides": Param([], items=Param("", type=str)), "profile": Param("tiny", choices=tasks.PROFILES)}
LEVEL = {"method": Param("", type=str), "preset": Param("", type=str), "hp": Param({}, type=dict, null=True),
         "overrides": Param([], items=Param("", type=str), null=True)}


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
    if not isinstance(cfg, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (name, tasks, axes, ...)")
    for key in ("name", "tasks", "axes"):
        if key not in cfg:
            raise SweepError(f"{path}: missing required key {key!r}")
    if not isinstance(cfg["axes"], dict) or not all(isinstance(v, dict) and v for v in cfg["axes"].values()):
        raise SweepError(f"{path}: 'axes' must map each axis name to a non-empty mapping of levels")
    cfg.setdefault("seeds", [0])
    cfg.setdefault("formulation", "rsm")
    cfg.setdefault("overrides", [])
    cfg.setdefault("profile", "tiny")
    try:
        check_keys(cfg, FILE, str(path))
        for key, param in FILE.items():
            cfg[key] = param.check(cfg.get(key), f"{path}: {key}")
        for axis, levels in cfg["axes"].items():
            for level, spec in levels.items():
                where = f"{path}: axes.{axis}.{level}"
                spec = {} if spec is None else spec
                if not isinstance(spec, dict):
                    raise SweepError(f"{where} must be a mapping of {', '.join(LEVEL)}, got {spec!r}")
                check_keys(spec, LEVEL, where)
                for key, param in LEVEL.items():
                    if key in spec:
                        param.check(spec[key], f"{where}.{key}")
    except TaskError as e:
        raise SweepError(str(e)) from None
    return cfg


def expand(cfg: dict) -> list[Point]:
    """Every point of tasks × axis levels × seeds × (processes, formulations), validated."""
    reg = registry.load_all()
    axes = list(cfg["axes"].items())
    forms = ("rsm", "original") if cfg["formulation"] == "both" else (cfg["formulation"],)
    points = []
    task_cache = {}
    for task in cfg["tasks"]:
        if task not in task_cache:  # a bad task name or override is the file's error, not a skipped point
            tc = tasks.load(task, cfg["overrides"], cfg["profile"])
            task_cache[task] = (tc, tasks.build_reward(tc))
        tc, reward = task_cache[task]
        for combo in itertools.product(*[list(levels.items()) for _, levels in axes]):
            levels = {name: lv for (name, _), (lv, _) in zip(axes, combo)}
            specs = [spec or {} for _, spec in combo]
            methods = [s["method"] for s in specs if "method" in s]
            presets = [s["preset"] for s in specs if "preset" in s]
            hp = {k: v for s in specs for k, v in (s.get("hp") or {}).items()}
            overrides = [o for s in specs for o in (s.get("overrides") or [])]
            base = dict(task=task, levels=levels, hp=hp, overrides=overrides)
            why = "" if len(methods) == 1 else f"{len(methods)} axis levels name a method (need one)"
            mid = methods[0] if len(methods) == 1 else None
            label = ",".join(f"{a}={v}" for a, v in levels.items())
            if not why and mid not in reg:  # a typo is the file's error
                raise SweepError(f"sweep {cfg['name']!r} [{label}]: unknown method {mid!r}"
                                 f"{did_you_mean(mid, reg)}; choose from {', '.join(sorted(reg))}")
            if not why and presets:
                hp = _with_preset(reg[mid], presets[0], hp, f"sweep {cfg['name']!r} [{label}]")
            if not why:  # every hyperparameter name, type and range, as the method declares them
                reg[mid]().validate_hparams({**reg[mid].defaults, **hp}, where=f"sweep {cfg['name']!r} [{label}] hp")
            procs = [None]
            if not why:
                why = applies(reg[mid], tc, reward)
                procs = bench.processes(reg[mid], tc) or [None]
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
        tasks.check_base(tc, kind)
    except CheckpointError as e:
        return str(e)
    return ""


def _with_preset(m, name: str, hp: dict, where: str) -> dict:
    """Merge a method preset (``first`` = its first listed one) under the level's hp."""
    if not m.presets:
        raise SweepError(f"{where}: {m.id} has no published preset")
    name = next(iter(m.presets)) if name == "first" else name
    if name not in m.presets:
        raise SweepError(f"{where}: {m.id} has no preset {name!r}{did_you_mean(name, m.presets)}; "
                         f"choose from {', '.join(m.presets)}")
    return {**{k: v for k, v in m.presets[name].items() if k != "source"}, **hp}


def _task_cfg(pt: Point, cfg: dict):
    tc = tasks.load(pt.task, list(cfg["overrides"]) + list(pt.overrides), cfg["profile"])
    if pt.hp:
        tc = OmegaConf.merge(tc, {"methods": {pt.method: pt.hp}})
    return tc


def run_config(pt: Point, cfg: dict):
    tc = _task_cfg(pt, cfg)
    rc = run_spec(tc, pt.method, pt.formulation, pt.process, pt.seed)
    rc["sweep"] = {"name": cfg["name"], **pt.levels}
    # the point's iterations at its measured cost, the last one cut to fit (as the bench plans them):
    # an estimator that changes a method's queries per sample still spends the budget, never more
    return tc, budget.plan([rc], check=False)[0]


def _validate(pt: Point, cfg: dict) -> tuple[str, int]:
    """('' or the reason the point cannot run, its reward-query budget). A bad value (a level's task
    overrides, a hyperparameter) raises: it is the file's error, not a point to skip."""
    _, rc = run_config(pt, cfg)
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
    if args.workers < 1 or args.cpus_per_point < 1:
        raise UserError(f"--workers and --cpus-per-point must be >= 1, got {args.workers}, {args.cpus_per_point}")
    points = expand(cfg)
    print(dry_run_table(points) if args.dry_run else
          f"sweep {cfg['name']}: {sum(not p.skip for p in points)} runs, "
          f"{sum(bool(p.skip) for p in points)} skipped (see --dry-run)")
    if args.dry_run:
        return 0
    todo = [p for p in points if not p.skip]
    bench.probe([run_config(p, cfg)[1] for p in todo])  # each configuration's first iteration, nothing written
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

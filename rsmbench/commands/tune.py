"""`rsmbench tune`: the tuning protocol of ``rsmbench.run.tuning``, run and written to the task's
tuned file.

    rsmbench tune --task T [--methods a,b] [--seeds N] [--lr-grid x,y,...] [--strength-grid f,g,...]
                  [--workers W] [--no-progress] [key=value ...]
"""
from __future__ import annotations

import sys
import time

import torch

from rsmbench.core import method as registry
from rsmbench.errors import UserError
from rsmbench.run import bench, tasks, tracking, tuning
from rsmbench.run.runspec import config_hash, run_spec
from rsmbench.run.setup import shared_reward


def add_parser(sub):
    p = sub.add_parser("tune", help="tune every method's learning rate and strength on a task (tuning seeds), "
                                    "write tasks/tuned/<task>.yaml")
    p.add_argument("--task", required=True, help="a task of tasks/ (tiny profile)")
    p.add_argument("--methods", default="all", help="comma-separated method ids, or 'all' (default: all)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"tuning seeds {tuning.SEED_OFFSET}.. (default: the task's tune.seeds, else 1)")
    p.add_argument("--lr-grid", default=None, help="comma-separated learning rates (default: the task's tune.lr)")
    p.add_argument("--strength-grid", default=None,
                   help="comma-separated factors on each method's strength coefficient (default: tune.strength)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value task-config overrides")
    p.set_defaults(run=run)


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"--{what} expects comma-separated numbers, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise UserError(f"--{what} expects positive numbers, got {text!r}")
    return vals


def plan(args):
    """(task_cfg, {method/process: [(point, [specs])]}, all specs), every input validated."""
    cfg = tasks.load(args.task, args.overrides)
    reward = shared_reward(cfg.reward)
    reg = registry.load_all()
    ids = [i for i in sorted(reg) if not bench.applies(reg[i], cfg, reward)] if args.methods in ("all", "") \
        else [i for i in args.methods.split(",") if i]
    for i in ids:
        if i not in reg:
            raise UserError(f"unknown method {i!r}; choose from all, {', '.join(sorted(reg))}")
        why = bench.applies(reg[i], cfg, reward)
        if why:
            raise UserError(f"method {i!r} does not apply to task {cfg.name!r}: {why}")
    n_seeds = args.seeds if args.seeds is not None else int((cfg.get("tune") or {}).get("seeds", 1))
    if n_seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {n_seeds}")
    if getattr(args, "workers", 1) < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    seeds = [tuning.SEED_OFFSET + k for k in range(n_seeds)]
    lrs, factors = _floats(args.lr_grid, "lr-grid"), _floats(args.strength_grid, "strength-grid")
    form = str(cfg.bench.get("formulation", "original"))
    for k in sorted({k for i in ids for k in bench.processes(reg[i], cfg)}):
        tasks.check_base(cfg, k)  # loads, predicts what the process samples with, is the task's network
    where, specs = [], []
    for i in ids:
        for k in bench.processes(reg[i], cfg):
            for point in tuning.grid(cfg, reg[i], lrs, factors):
                where += [(f"{i}/{k}", point)] * len(seeds)
                specs += [run_spec(cfg, i, form, k, s, None, point) for s in seeds]
    grid: dict = {}
    for (key, point), spec in zip(where, bench.planned(specs)):  # matched budgets, as in the bench
        pts = grid.setdefault(key, [])
        if not pts or pts[-1][0] is not point:
            pts.append((point, []))
        pts[-1][1].append(spec)
    return cfg, grid, seeds


def run(args) -> int:
    t0 = time.time()
    cfg, grid, seeds = plan(args)
    torch.set_num_threads(1)
    metric, higher = str(cfg.bench.get("metric", "eval/reward_mean")), bool(cfg.bench.get("higher_is_better", True))
    tracker = tracking.Tracker()
    exp_name = f"{cfg.name}-tune"
    exp = tracker.experiment(exp_name)
    tags, parents = {}, {}
    for key, pts in grid.items():
        mid = key.split("/")[0]
        parents[key] = tracker.create_run(exp, f"tune {key}", {"tune": "parent", "method": mid, "task": str(cfg.name)})
        for _, ss in pts:
            for s in ss:
                tags[config_hash(s)] = {"mlflow.parentRunId": parents[key], "tune": "point"}
    specs = [s for pts in grid.values() for _, ss in pts for s in ss]
    print(f"tune {cfg.name}: {len(grid)} method/process pairs, {len(specs)} runs on seeds {seeds}, metric {metric}; "
          f"MLflow experiment {exp_name!r}", flush=True)
    records = bench.execute_parallel(specs, args.workers, not args.no_progress, _log, False, exp_name, tags)
    by_hash = {r["config_hash"]: r for r in records}
    results, selected, grid_out = {}, {}, {}
    for key, pts in grid.items():
        scores, rows = {}, []
        for j, (pt, ss) in enumerate(pts):
            vals, kls = [], []
            for s in ss:
                rec = by_hash[config_hash(s)]
                run = tracker.get_run(rec["run_id"]) if "run_id" in rec else None
                ok = run is not None and run.info.status == "FINISHED" and metric in run.data.metrics
                vals.append(run.data.metrics[metric] if ok else None)
                kls.append(run.data.metrics.get("eval/kl_ref") if ok else None)
            scores[j] = vals
            rows.append({"lr": pt["lr"], **pt["hp"], "scores": vals,
                         "kl": [round(k, 6) if k is not None else None for k in kls]})
        best = tuning.select(scores, higher)
        results[key], grid_out[key] = rows, {"lr": sorted({p["lr"] for p, _ in pts}),
                                             **{h: sorted({p["hp"][h] for p, _ in pts}) for h in pts[0][0]["hp"]}}
        if best is not None:
            selected[key] = pts[best][0]
            tracker.log_metrics(parents[key], {f"best/{metric}": float(sum(scores[best]) / len(scores[best]))}, 0)
        tracker.finish(parents[key], "FINISHED")
    path = tuning.write(cfg, grid_out, results, selected, seeds, time.time() - t0)
    for key in grid:
        sel = selected.get(key)
        print(f"{key:28s} " + (f"lr {sel['lr']:g} " + " ".join(f"{k} {v:g}" for k, v in sel["hp"].items())
                               if sel else "every grid point diverged"), flush=True)
    print(f"tuned values written to {path} ({time.time() - t0:.1f} s)")
    return 0


def _log(*a, file=None):
    print(*a, file=file or sys.stderr, flush=True)

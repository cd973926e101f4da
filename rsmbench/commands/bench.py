"""`rsmbench bench`: run the methods of a task under a matched budget, log every run to MLflow, and
write the summary.

    rsmbench bench --task NAME [--profile tiny|sd15|sd35] [--methods ID,...|all]
                   [--formulation original|rsm|both] [--seeds N] [--budget matched|published]
                   [--untuned] [--workers W] [--retry-failed] [key=value ...]

Without --profile the bench takes the task's full-scale profile (sd15, then sd35) when its weights
are found locally (a directory or the HF cache, never a download), else tiny, and says which and why
in one line. Planning (``rsmbench.run.bench.plan``) validates every input first: a bad value is one
line and exit code 2 with nothing written. The runs go through ``rsmbench.run.bench.execute`` (one
process per worker, or N processes per run under ``accelerate launch``/``torchrun``); the summary
(``rsmbench.analysis.summary``) covers every run of the task's default configuration that the store
holds, plus this call's runs, and goes to ``reports/<task>/summary.md``.
"""
from __future__ import annotations

import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import torch

from rsmbench.analysis import summary
from rsmbench.errors import UserError
from rsmbench.run import bench, distributed, paths, tracking


def add_parser(sub):
    p = sub.add_parser("bench", help="compare methods on a task; runs go to MLflow, a summary to reports/")
    p.add_argument("--task", required=True, help="a task of tasks/ (rsmbench list tasks)")
    p.add_argument("--profile", default=None,
                   help="tiny, sd15 or sd35 (default: the task's full-scale profile if its weights are found "
                        "locally, else tiny; one line says which and why)")
    p.add_argument("--methods", default="all", help="comma-separated method ids, or 'all' (default: all)")
    p.add_argument("--formulation", default=None,
                   help="original, rsm or both (default: the task's bench.formulation, original)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the task's bench.seeds)")
    p.add_argument("--budget", choices=["matched", "published"], default=None,
                   help="reward-query budget: compute-matched (default) or each method's published one")
    p.add_argument("--untuned", action="store_true",
                   help="run the methods' presets, not the task's tuned values (tasks/tuned/<task>.yaml)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel runs, one torch thread each (default: 2 on the tiny profile, else 1)")
    p.add_argument("--report-dir", default=None, help="where summary.md goes (default: reports/<task>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-run runs that diverged (by default reported: a seeded run diverges the same way)")
    p.add_argument("overrides", nargs="*", help="key=value task-config overrides, e.g. train.lr=1e-3")
    p.set_defaults(run=run)


def _log(*a, file=None):
    print(*a, file=file or sys.stdout, flush=True)


def default_specs(cfg, args) -> list[dict]:
    """The runs of the task's default configuration (every applicable method, the task's seeds and
    formulation, tuned), with this call's overrides and profile: the rows the summary always covers."""
    default = Namespace(task=args.task, profile=args.profile, methods="all", formulation=None, seeds=None,
                        budget=None, untuned=False, overrides=args.overrides)
    try:
        return bench.plan(default, check=False)[1]  # only to find the default rows: no budget check
    except UserError:  # a default row these overrides make unrunnable is not this call's to report
        return []


def run(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    dist = distributed.make()  # N processes under accelerate launch / torchrun, else one
    t0 = time.time()
    # planning loads the reward and the base models (seconds to minutes): a word if it takes more than 3 s,
    # none before a quick one-line error
    note = threading.Timer(3.0, _log, (f"bench {args.task}: planning (loading the reward and base models) ...",),
                           {"file": sys.stderr})
    note.daemon = True
    if dist.is_main and not args.no_progress:
        note.start()
    try:
        cfg, specs = bench.plan(args)
    finally:
        note.cancel()
    covered = specs + [s for s in default_specs(cfg, args) if s not in specs]
    log = _log if dist.is_main else (lambda *a, **k: None)
    if getattr(args, "profile_note", None):
        log(args.profile_note)
    if not specs:
        raise UserError(f"no method applies to task {cfg.name!r}")
    workers = args.workers if args.workers is not None else (2 if cfg.profile == "tiny" and dist.world == 1 else 1)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // max(dist.world, workers)))
    log(f"bench {cfg.name}: {len(specs)} runs ({len({s['method'] for s in specs})} methods), budget "
        f"{specs[0]['budget']['reward_queries']} reward queries each"
        + (f", {dist.world} processes per run" if dist.world > 1 else f", {workers} worker(s)")
        + f"; MLflow at {tracking.tracking_uri()}")
    if dist.is_main:  # the experiment's description: the task's title
        tracking.Tracker().experiment(str(cfg.name), description=str(cfg.get("title") or cfg.name))
    if dist.world > 1:
        records = bench.execute(specs, not args.no_progress, _log, args.retry_failed, dist=dist)
    else:
        records = bench.execute_parallel(specs, workers, not args.no_progress, _log, args.retry_failed)
    if not dist.is_main:
        return 0
    report_dir = Path(args.report_dir) if args.report_dir else paths.reports_root() / str(cfg.name)
    table, path = summary.write(cfg, covered, time.time() - t0, report_dir)
    log(table)
    log(f"summary written to {path} ({time.time() - t0:.1f} s)")
    log(f"MLflow runs table (after `make ui`): {tracking.ui_url(tracking.Tracker().experiment(str(cfg.name)))}")
    return 1 if any(r.get("status") == "failed" for r in records) else 0  # a divergence is a result, not an error

"""`rsmbench bench`: run the selected methods on a task, log every run to MLflow, summarise.

    rsmbench bench --task NAME [--profile tiny|sd15|sd35] [--methods ID,...|all]
                   [--formulation rsm|original|both] [--seeds N] [--budget matched|published]
                   [key=value ...]

Without --profile the bench takes the task's full-scale profile (sd15, then sd35) when its weights
are found locally (``fullscale.check_weights``: a directory or the HF cache, never a download), else
tiny, and says which and why in one line. With a full-scale profile, missing model or reward weights
are one line and exit code 2 before anything is created.

A run is method × formulation × process × seed (the task's ``bench.processes`` that the method
supports). Every input is validated before anything is written: a bad task, profile, method,
formulation or override is one line and exit code 2. Runs are matched by the hash of their
resolved config: a FINISHED one is skipped, an interrupted one resumes from its checkpoint into
the same MLflow run, and a per-run file lock keeps concurrent bench processes from doubling one.
A NaN/inf reward or loss fails that run (status FAILED, tags ``error`` and ``nonfinite``) and the others
go on; being seeded, it would fail the same way again, so a re-run reports it without re-running it
(``--retry-failed`` re-runs it). Runs that failed otherwise (an exception, a kill) are resumed.
At the end: a summary table (mean ± 95% t-interval over seeds) on stdout and in
``reports/<task>/summary.md``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from rsmbench.core import method as registry
from rsmbench.core.checkpoints import load_checkpoint
from rsmbench.errors import UserError
from rsmbench.run import fullscale, paths, tasks, tracking
from rsmbench.run.train import NonFiniteError, run_config, shared_reward, tiny_evaluator, train_run

FORMULATION_CHOICES = ("rsm", "original", "both")


def add_parser(sub):
    p = sub.add_parser("bench", help="compare methods on a task; runs go to MLflow, a summary to reports/")
    p.add_argument("--task", required=True)
    p.add_argument("--profile", default=None,
                   help="tiny, sd15 or sd35 (default: the task's full-scale profile if its weights are found "
                        "locally, else tiny; one line says which and why)")
    p.add_argument("--methods", default="all", help="comma-separated method ids, or 'all' (default)")
    p.add_argument("--formulation", default=None, help="rsm, original or both (default: the task's bench.formulation)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the task's bench.seeds)")
    p.add_argument("--budget", choices=["matched", "published"], default=None,
                   help="reward-query budget: compute-matched (default) or each method's published one")
    p.add_argument("--report-dir", default=None, help="where summary.md goes (default: reports/<task>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-run runs that stopped on a NaN/inf (skipped by default: a seeded run fails the same way)")
    p.add_argument("overrides", nargs="*", help="key=value task-config overrides, e.g. train.lr=1e-3")
    p.set_defaults(run=_run)


# ---- planning (no side effects) ----------------------------------------------------------------------
def applies(m, task_cfg, reward) -> str:
    """'' if method class m can run on the task, else why not."""
    kinds = [k for k in task_cfg.bench.processes if k in task_cfg.processes]
    if not any(k in m.processes for k in kinds):
        return f"it supports the {'/'.join(m.processes)} process(es), the task has {'/'.join(kinds)}"
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


def plan(args):
    """Validate everything and return (task_cfg, [run configs]). Raises ``UserError``.
    Without --profile, sets ``args.profile`` and ``args.profile_note`` (see ``choose_profile``)."""
    if getattr(args, "profile", None) is None:
        args.profile, args.profile_note = choose_profile(args.task, args.overrides)
    cfg = tasks.load(args.task, args.overrides, args.profile)
    if args.profile != "tiny":  # weights first: a missing one is one line, before anything is loaded
        check_full_scale(cfg)
    reward = shared_reward(cfg)
    formulation = args.formulation or cfg.bench.get("formulation", "both")
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
    kinds = [k for k in cfg.bench.processes if k in cfg.processes]
    for k in kinds if cfg.profile == "tiny" else ():  # full scale: the SD model was checked above
        if any(k in reg[i].processes for i in ids):
            load_checkpoint(tasks.resolve_path(cfg.processes[k].model.checkpoint), task=cfg.name)
    runs = [run_config(cfg, i, f, k, s, args.budget)
            for i in ids for k in kinds if k in reg[i].processes for f in forms for s in range(seeds)]
    return cfg, runs


# ---- execution -------------------------------------------------------------------------------------------
def run_name(rc: dict) -> str:
    return f"{rc['method']}-{rc['formulation']}-{rc['process']}-s{rc['seed']}"


def execute(cfg, runs, progress: bool = True, log=print, retry_failed: bool = False) -> list[dict]:
    """Run (or skip, or resume) every planned run; returns one record per run."""
    tracker = tracking.Tracker()
    exp = tracker.experiment(str(cfg.name))
    env_tags = tracking.environment_tags()
    root = tracking.results_root()
    bar = _bar(len(runs), progress)
    records, deferred = [], list(runs)
    for blocking in (False, True):  # first pass skips runs another process holds; second waits for them
        todo, deferred = deferred, []
        for rc in todo:
            chash = tracking.config_hash(rc)
            with tracking.file_lock(root / "locks" / f"{chash}.lock", blocking=blocking) as got:
                if not got:
                    deferred.append(rc)
                    continue
                rec = _one(cfg, tracker, exp, rc, chash, env_tags, root, bar, log, retry_failed)
                records.append(rec)
                bar.update(1)
    bar.close()
    order = {tracking.config_hash(rc): k for k, rc in enumerate(runs)}
    return sorted(records, key=lambda r: order[r["config_hash"]])


def _one(cfg, tracker, exp, rc, chash, env_tags, root, bar, log, retry_failed=False) -> dict:
    name = run_name(rc)
    rec = {"config_hash": chash, "rc": rc, "name": name}
    prev = tracker.find_run(exp, chash)
    if prev is not None and prev.info.status == "FINISHED":
        rec.update(run_id=prev.info.run_id, status="skipped")
        bar.set_postfix_str(f"{name}: done, skipped")
        return rec
    if prev is not None and prev.data.tags.get("nonfinite") == "true" and not retry_failed:
        err = prev.data.tags.get("error", "non-finite value")
        log(f"FAILED {name} (earlier run, not re-run; --retry-failed re-runs it): {err}", file=sys.stderr)
        rec.update(run_id=prev.info.run_id, status="failed", error=err)
        return rec
    m = registry.get(rc["method"])
    ckpt = root / "runs" / chash
    if prev is not None:
        run_id = prev.info.run_id
        tracker.reopen(run_id, clear_tags=[t for t in ("error", "traceback", "nonfinite") if t in prev.data.tags])
        rec["status"] = "resumed"
    else:
        tags = {"config_hash": chash, "method": rc["method"], "formulation": rc["formulation"],
                "process": rc["process"], "seed": rc["seed"], "profile": rc["profile"], "task": rc["task"],
                "method_family": f"{m.order}-order", "table1": m.table1 or "", "equivalence_kind": m.kind,
                "paper": m.paper or "", "budget_mode": rc["budget"]["mode"], **env_tags}
        run_id = tracker.create_run(exp, name, tags)
        tracker.log_params(run_id, tracking.flatten(rc))
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "config.json").write_text(json.dumps(rc, indent=1, sort_keys=True, default=str))
        tracker.log_artifact(run_id, ckpt / "config.json")
        rec["status"] = "new"
    rec["run_id"] = run_id
    last = {"step": tracker.last_step(run_id, "iteration")}

    def log_metrics(metrics, step):
        if step > last["step"]:
            tracker.log_metrics(run_id, metrics, step)
            last["step"] = step

    def on_iteration(it, metrics):
        bar.set_postfix_str(f"{name} it {it} r {metrics['train/reward_mean']:.3f} "
                            f"q {int(metrics['train/reward_queries'])}/{rc['budget']['reward_queries']}")

    try:
        res = train_run(rc, cfg, log_metrics, lambda p: tracker.log_artifact(run_id, p, "samples"),
                        ckpt, on_iteration)
    except NonFiniteError as e:
        msg = f"{name}: {e}"
        log(f"FAILED {msg}", file=sys.stderr)
        tracker.set_tags(run_id, {"error": str(e), "nonfinite": "true"})
        tracker.finish(run_id, "FAILED")
        rec.update(status="failed", error=str(e))
        return rec
    except Exception as e:  # noqa: BLE001 - one broken method must not stop the bench
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"FAILED {name}: {line}", file=sys.stderr)
        tracker.set_tags(run_id, {"error": line[:5000], "traceback": traceback.format_exc()[-5000:]})
        tracker.finish(run_id, "FAILED")
        rec.update(status="failed", error=line)
        return rec
    tracker.finish(run_id, "FINISHED")
    rec["iterations"] = res.iterations
    return rec


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


# ---- summary -----------------------------------------------------------------------------------------------
def ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan for a single seed)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def summarize(cfg, records) -> tuple[str, list[dict]]:
    """Aggregate the final eval metrics of the runs over seeds (read back from MLflow)."""
    tracker = tracking.Tracker()
    groups: dict = {}
    for rec in records:
        rc = rec["rc"]
        key = (rc["method"], rc["formulation"], rc["process"])
        g = groups.setdefault(key, {"runs": 0, "failed": 0, "vals": {}})
        g["runs"] += 1
        if rec.get("status") == "failed" or "run_id" not in rec:
            g["failed"] += 1
            continue
        run = tracker.get_run(rec["run_id"])
        if run.info.status != "FINISHED":
            g["failed"] += 1
            continue
        mets = run.data.metrics  # latest value of each key = the final eval
        for k in ("eval/reward_mean", "eval/kl_ref", "eval/J_gap", "eval/J_gap_exact", "eval/sw_to_target",
                  "train/reward_queries", "train/wall_time", "eval/diversity", "eval/prior_frechet"):
            if k in mets:
                g["vals"].setdefault(k, []).append(mets[k])
    gmm = any("eval/J_gap" in g["vals"] for g in groups.values())
    rows = []
    for (mid, form, proc), g in groups.items():
        row = {"method": mid, "formulation": form, "process": proc, "seeds": g["runs"] - g["failed"],
               "failed": g["failed"]}
        for k, v in g["vals"].items():
            row[k] = ci95(v)
        rows.append(row)
    head = ["method", "form.", "process", "seeds", "reward (±95% CI)", "KL"]
    head += ["J-gap (±95% CI)", "J-gap exact", "SW→p*"] if gmm else []
    head += ["diversity", "prior FD", "queries", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def num(v, p=3):
        return f"{v:.{p}f}" if abs(v) < 1e4 else f"{v:.2e}"

    def fmt(t, p=3):  # mean ± 95% CI half-width
        if t is None or not math.isfinite(t[0]):
            return "–"
        return num(t[0], p) if not math.isfinite(t[1]) else f"{num(t[0], p)} ± {num(t[1], p)}"

    def one(t, p=3):
        return "–" if t is None or not math.isfinite(t[0]) else num(t[0], p)

    for r in rows:
        cells = [r["method"], r["formulation"], r["process"],
                 f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                 fmt(r.get("eval/reward_mean")), one(r.get("eval/kl_ref"))]
        if gmm:
            cells += [fmt(r.get("eval/J_gap")), one(r.get("eval/J_gap_exact")), one(r.get("eval/sw_to_target"))]
        cells += [one(r.get("eval/diversity")), one(r.get("eval/prior_frechet")),
                  one(r.get("train/reward_queries"), 0), one(r.get("train/wall_time"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def base_line(cfg) -> str:
    """The base model's own eval (what every run starts from) and, for gmm, the floors and J*."""
    if cfg.profile != "tiny":  # the full-scale base eval is each run's iteration 0 in MLflow
        return ""
    out = []
    for kind in cfg.bench.processes:
        if kind not in cfg.processes:
            continue
        ev = tiny_evaluator(cfg, kind)  # the base samples the runs were evaluated against
        m, _ = ev(ev.ref, at_base=True)
        out.append(f"- {kind} base model on the eval seeds: reward {m['eval/reward_mean']:.3f} "
                   f"(std {m['eval/reward_std']:.3f}), diversity {m['eval/diversity']:.3f}")
        if ev.gt is None:  # only gmm knows its optimum
            continue
        b = ev.base_extra
        out.append(f"- {kind} base: E[r] = J_ref = {b['J_ref']:.3f}; J* = {b['J_star_model']:.3f} (base-model MC), "
                   f"{b['J_star_exact']:.3f} (exact mixture); base gap J* − J_ref = {b['gap_ref']:.3f}; "
                   f"SW floors: exact-vs-exact {b['sw_floor_exact']:.3f}, base-vs-mixture "
                   f"{b['sw_base_to_mixture']:.3f}, base-vs-target {b['sw_base_to_target']:.3f}")
    return "\n".join(out)


def write_report(cfg, table: str, records, seconds: float, report_dir: Path) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "summary.md"
    failed = [r for r in records if r.get("status") == "failed"]
    text = [f"# {cfg.name}: {cfg.get('title', '')}", "",
            f"Profile `{cfg.profile}`; reward-query budget {cfg.budget.reward_queries} per run "
            f"({cfg.budget.mode}); eval: {cfg.eval.num_samples} samples, seeds from {cfg.eval.seed_start}, "
            f"sampler {cfg.eval.sampler}. Final eval per run; mean ± 95% t-interval over seeds.", "", table, ""]
    bl = base_line(cfg)
    if bl:
        text += ["Reference values (the base model; gmm: J* and floors):", "", bl, ""]
    if failed:
        text += ["Failed runs:", ""] + [f"- {r['name']}: {r.get('error', '')}" for r in failed] + [""]
    text.append(f"{len(records)} runs ({sum(r.get('status') == 'skipped' for r in records)} skipped as finished) "
                f"in {seconds:.1f} s.")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(text) + "\n")
    os.replace(tmp, path)
    return path


def _log(*a, file=None):
    print(*a, file=file or sys.stdout, flush=True)


def _run(args) -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    cfg, runs = plan(args)
    if getattr(args, "profile_note", None):
        _log(args.profile_note)
    if not runs:
        raise UserError(f"no method applies to task {cfg.name!r}")
    _log(f"bench {cfg.name}: {len(runs)} runs ({len({r['method'] for r in runs})} methods), "
         f"budget {runs[0]['budget']['reward_queries']} reward queries each; MLflow at "
         f"{tracking.tracking_uri()}")
    records = execute(cfg, runs, progress=not args.no_progress, log=_log, retry_failed=args.retry_failed)
    table, _ = summarize(cfg, records)
    seconds = time.time() - t0
    report = write_report(cfg, table, records, seconds, Path(args.report_dir or paths.reports_root() / str(cfg.name)))
    _log(table)
    _log(f"summary written to {report} ({seconds:.1f} s)")
    return 1 if any(r.get("status") == "failed" for r in records) else 0

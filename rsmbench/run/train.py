"""One training loop for every method and both formulations.

Per iteration k (CleanRL-style; every hyperparameter comes from the run spec, ``rsmbench.run.runspec``):
    θ† = a frozen copy of θ                                  (setup.new_behaviour)
    batch = method.collect(ctx, cond, seeds); method.prepare(batch, ctx)
    repeat train.inner_updates times:
        loss = formulation_loss(method, formulation, batch, ctx)   original_loss | the RSM loss
        (accumulated over chunks of train.micro_rows rows), AdamW step after clipping the gradient norm
    every eval.every iterations and at the end: the pinned evaluation (``rsmbench.run.evaluate``)
until the reward-query budget is spent. What is trained (the tiny net, or a full-scale SD model with
LoRA) is built by ``rsmbench.run.setup`` from the spec; reward queries and NFEs are counted by the
wrappers of ``rsmbench.run.accounting``.

The same loop runs on N processes (``rsmbench.run.distributed``): each collects its shard of the
batch, advantages come from the gathered rewards, gradients and counts are summed over processes, and
rank 0 evaluates, checkpoints and logs.

Resumability (``rsmbench.run.resume``): every ``checkpoint_every`` iterations the net, the
optimizer, the counters and the not-yet-logged metrics are written atomically; metrics are logged
only after the checkpoint that contains them, and a resumed run logs only steps beyond the last
logged one, so a run killed anywhere has neither a gap nor a duplicate in its metric history.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rsmbench.core import method as registry
from rsmbench.core.method import FORMULATIONS, Context, formulation_loss
from rsmbench.core.models import Policy
from rsmbench.run import budget as budgets
from rsmbench.run import distributed, fullscale, setup
from rsmbench.run.accounting import Counters, CountingReward
from rsmbench.run.evaluate import OUTCOMES, plot_captioned_grid, plot_first_vs_last, plot_samples, sample_view
from rsmbench.run.resume import load_state, save_state


class Diverged(RuntimeError):
    """The run left its task's sane range (``divergence:``) or turned non-finite: it stops, and the
    bench reports it as diverged at this iteration, never as a number."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


class Overspent(RuntimeError):
    """A run of a matched comparison spent more than 1 % beyond its reward-query budget."""


@dataclass
class RunResult:
    iterations: int
    counters: Counters
    final_eval: dict = field(default_factory=dict)


def train_run(spec: dict, log_metrics=None, log_artifact=None, ckpt_dir: Path | None = None,
              on_iteration=None, stop_after: int | None = None, dist=None, log_reference=None) -> RunResult:
    """Run one method × formulation × process × seed (its spec) to its reward-query budget.

    log_metrics(metrics: dict, step) and log_artifact(path) receive what is logged (MLflow in the
    bench; lists in tests). ``log_reference(values)`` receives once the task's constant reference values
    (gmm: J*, the SW floors), which are not metrics of the run. ``stop_after`` simulates a kill after
    that many iterations (tests).
    ``dist``: the process group (``distributed.Single()`` by default); on ranks other than 0 nothing
    is evaluated, logged or checkpointed.
    """
    dist = dist or distributed.Single()
    torch.manual_seed(spec["seed"])
    m = registry.get(spec["method"])
    kind, formulation, tr = spec["process"], spec["formulation"], spec["train"]
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)}")
    counters, local = Counters(), Counters()  # global totals; this process's counts since the last sum
    S = setup.build(spec, m, local, with_eval=dist.is_main)
    process, policy, ref, gt, evaluator = S.process, S.policy, S.ref, S.gt, S.evaluator
    net, cfg_scale = policy.net, policy.cfg_scale
    reward = CountingReward(S.reward, local)
    opt = torch.optim.AdamW(S.params, lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    log_metrics = log_metrics or (lambda metrics, step: None)
    log_artifact = log_artifact or (lambda path: None)

    start, pending = 0, []
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    st = load_state(ckpt_dir) if ckpt_dir is not None else None
    if st is not None:  # resume
        S.load(st["net"])
        opt.load_state_dict(st["opt"])
        start = int(st["iteration"])
        counters.__dict__.update(st["counters"])
        pending = st["pending"]
        m.load_state_dict(st.get("method") or {})
    for step, metrics in pending:  # logged before the kill? the logger drops steps already present
        log_metrics(metrics, step)
    pending = []

    budget = int(spec["budget"]["reward_queries"])
    sched = spec["budget"].get("schedule")  # rsmbench.run.budget; None: scheduled after the first iteration
    max_it, ck_every = int(tr["max_iterations"]), int(tr["checkpoint_every"])
    points = [budget * j / int(spec["eval"]["points"]) for j in range(1, int(spec["eval"]["points"]) + 1)]
    guard = Guard(spec.get("divergence") or {})
    hp = dict(spec["hp"])
    micro_rows = int(tr.get("micro_rows") or 0)  # gradient accumulation over row chunks
    loss_rows = 0 if formulation in m.whole_chain_formulations else micro_rows  # 0: the whole batch at once

    names = prompt_names(spec)
    pass_threshold = getattr(evaluator.reward, "pass_threshold", None) if evaluator else None  # grids: ✓/✗

    def evaluate(it: int, last: bool = False) -> dict:
        if not dist.is_main:
            return {}
        net.eval()
        ev, x, r = evaluator(Policy(net, S.eval_process, cfg_scale), at_base=it == 0)  # θ = base at iteration 0
        ev["iteration"] = it
        if gt is not None and it == 0 and log_reference is not None:
            log_reference(dict(evaluator.base_extra))
        if ckpt_dir is not None:  # samples_<it>.png of the last eval (or the diverged one), beside iteration 0
            title = f"{spec['method']} ({formulation}, {kind}, seed {spec['seed']})"
            ref_pts = dict(base=evaluator.base.final, target=None if gt is None else gt.exact_a)
            view = sample_view(x, r, evaluator.cond, names, f"iteration {it}", S.to_images, **ref_pts,
                               pass_threshold=pass_threshold, audit=audit_passed(x))
            last_view.update(it=it, view=view, title=title, refs=ref_pts, x=x, ev=ev)
            save_outcomes(it, x)
            if last:  # the evals before are metrics only; iteration 0 is the left panel of first_vs_last
                save_grid()
                first_vs_last(f"{title}: the same eval seeds at iteration 0 and {it}")
        return ev

    def save_outcomes(it: int, x):
        """``eval_outcomes.json``: the per-sample outcomes of every eval so far (``{"strata", "evals": {it: scores}}``),
        where the reward gives them (shapes: ``eval_outcomes``); the summary's paired test against the base model
        reads the first and the last (``summary.paired_vs_base``). Rewritten whole at each eval, so a resumed run keeps
        the evals before its kill."""
        outcomes = getattr(evaluator.reward, "eval_outcomes", None)
        if outcomes is None:
            return
        o = outcomes(x, evaluator.cond)
        path = ckpt_dir / OUTCOMES
        doc = json.loads(path.read_text()) if path.is_file() else {"strata": o["strata"], "evals": {}}
        doc["evals"][str(it)] = o["scores"]
        path.write_text(json.dumps(doc))
        log_artifact(path)

    def save_grid():
        """samples_<it>.png of the latest eval: captioned with the prompt and pass/fail where the reward
        has a pass/fail (shapes), else ``plot_samples``."""
        it, x, title = last_view["it"], last_view["x"], last_view["title"]
        png = ckpt_dir / f"samples_{it:06d}.png"
        if hasattr(evaluator.reward, "passed"):
            cond = evaluator.cond.tolist()
            keep = [cond.index(c) for c in dict.fromkeys(cond)][:24]  # the first sample of each prompt
            ok = evaluator.reward.passed(x[keep], evaluator.cond[keep]).tolist()
            acc, audit = (last_view["ev"].get(f"eval/{k}/overall") for k in ("accuracy", "audit"))
            plot_captioned_grid(png, x[keep], [names[cond[k]] for k in keep], passed=ok, ncol=8,
                                title=f"{title} iteration {it}" + ("" if acc is None else f": accuracy {acc:.2f}")
                                + ("" if audit is None else f" (audit {audit:.2f})"))
        else:
            plot_samples(png, title=title, **last_view["view"])
        log_artifact(png)

    last_view = {}  # the latest eval's sample view: a diverged run shows it beside iteration 0

    def audit_passed(x):  # shapes: the eval-only detector's 0/1 per sample (rewards/shapes.py), else None
        return getattr(evaluator.reward, "audit_passed", lambda *_: None)(x, evaluator.cond)

    def first_vs_last(title: str):
        first = sample_view(evaluator.base.final, evaluator.base_rewards(), evaluator.cond, names,
                            "iteration 0 (base model)", S.to_images, **last_view["refs"],
                            pass_threshold=pass_threshold, audit=audit_passed(evaluator.base.final))
        png = ckpt_dir / "samples_first_vs_last.png"
        plot_first_vs_last(png, first, last_view["view"], title)
        log_artifact(png)

    def flush_and_stop(e: Diverged):
        for step, mm in pending:  # the history up to the last sane iteration is kept
            log_metrics(mm, step)
        if dist.is_main and ckpt_dir is not None and last_view and last_view["it"] > 0:
            save_grid()
            first_vs_last(f"{last_view['title']}: iteration 0 and {last_view['it']}, its last eval; "
                          f"DIVERGED at iteration {e.iteration}")
        raise e

    if start == 0:
        pending.append((0, evaluate(0)))
    it, t_prev, final_eval = start, time.time(), {}
    while it < max_it and (it < sched["iterations"] if sched else counters.reward_queries < budget):
        if stop_after is not None and it - start >= stop_after:
            break
        it += 1
        # -- collect on θ† ------------------------------------------------------------------------
        behaviour = S.new_behaviour()
        cond = S.cond(it)
        if sched and it == sched["iterations"]:  # the last iteration is cut to fit the budget
            cond = cond[: sched["last_samples"]]
        ctx = Context(process=process, policy=policy, ref=ref, behaviour=behaviour, reward=reward, hp=hp,
                      shape=S.shape)
        seeds = [(spec["seed"] * 1_000_003 + it) * 65_536 + k for k in range(len(cond))]
        net.eval()
        batch, rewards = dist.collect(m, ctx, cond, seeds)  # a net without classes ignores cond; groups use it
        try:
            _check_finite("reward", rewards, it)
        except Diverged as e:
            flush_and_stop(e)
        # -- optimise -----------------------------------------------------------------------------
        net.train()
        losses, gnorms, stat_sums = [], [], {}
        n_updates = int(hp.get("inner_updates", tr["inner_updates"]))
        (rows_total,) = dist.sum([len(batch.rows)])
        for _ in range(n_updates):
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for mb, frac in row_chunks(batch, loss_rows, rows_total):
                part = formulation_loss(m, formulation, mb, ctx)
                try:
                    _check_finite("loss", part, it)
                except Diverged as e:
                    flush_and_stop(e)
                (part * frac).backward() if frac != 1.0 else part.backward()
                loss = loss + part.detach() * frac
                for k, v in mb.extras.pop("stats", {}).items():  # row-weighted mean over chunks and updates
                    stat_sums[k] = stat_sums.get(k, 0.0) + _stat(v) * frac / n_updates
            dist.reduce_gradients(S.params)
            (loss,) = dist.sum([float(loss)])
            gn = torch.nn.utils.clip_grad_norm_(S.params, float(tr["grad_clip"]))
            try:
                _check_finite("gradient norm", gn, it)
            except Diverged as e:
                flush_and_stop(e)
            opt.step()
            m.on_optimizer_step()  # e.g. VGG-Flow's quantile clip threshold update
            losses.append(loss), gnorms.append(gn.item())
        now = time.time()
        counters.wall_time += now - t_prev
        t_prev = now
        dq, dn = dist.sum([local.reward_queries, local.nfe])
        counters.reward_queries, counters.nfe = counters.reward_queries + int(dq), counters.nfe + int(dn)
        local.reward_queries = local.nfe = 0
        stat_sums = dict(zip(stat_sums, dist.sum(list(stat_sums.values()))))
        # -- log ----------------------------------------------------------------------------------
        r = rewards.detach().double()
        metrics = {"iteration": it, "train/reward_mean": r.mean().item(), "train/reward_std": r.std().item(),
                   "train/reward_queries": counters.reward_queries, "train/nfe": counters.nfe,
                   "train/wall_time": counters.wall_time, "train/loss": float(np.mean(losses)),
                   "train/grad_norm": float(np.mean(gnorms))}
        stats = {**batch.extras.get("stats", {}), **stat_sums}  # collect-time stats, then the loss's
        metrics.update({f"train/{k}": _stat(v) for k, v in stats.items()})
        if "approx_kl" not in stats:
            kl_sum, kl_rows = _approx_kl(process, policy.net, behaviour, batch, cfg_scale, micro_rows)
            kl_sum, kl_rows = dist.sum([kl_sum, kl_rows])
            metrics["train/approx_kl"] = kl_sum / kl_rows if kl_rows else float("nan")
        for k in ("nfe", "reward_queries"):
            if k in batch.extras:
                metrics[f"train/method_reported_{k}"] = dist.sum([_stat(batch.extras[k])])[0]
        if sched is None and it == 1:  # full scale: the cost is known after one iteration
            sched = budgets.schedule(budget, counters.reward_queries / len(cond), len(cond), max_it)
            sched["iterations"] = max(sched["iterations"], 1)
        done = it >= max_it or (it >= sched["iterations"] if sched else counters.reward_queries >= budget)
        if done or (points and counters.reward_queries >= points[0]):
            while points and counters.reward_queries >= points[0]:
                points.pop(0)
            final_eval = evaluate(it, last=done)
            metrics.update(final_eval)
        try:
            guard(metrics, it)
        except Diverged as e:
            flush_and_stop(e)
        if not dist.is_main:
            continue
        pending.append((it, metrics))
        if on_iteration:
            on_iteration(it, metrics)
        if ckpt_dir is not None and (done or it % ck_every == 0):
            save_state(ckpt_dir, net, opt, it, counters, pending, S.state(), m.state_dict())
            for step, mm in pending:
                log_metrics(mm, step)
            pending = []
        t_prev = time.time()  # eval and logging are not training wall time
    if ckpt_dir is None:
        for step, mm in pending:
            log_metrics(mm, step)
    if spec["budget"]["mode"] == "matched" and counters.reward_queries > budget * 1.01 and stop_after is None:
        raise Overspent(f"spent {counters.reward_queries} reward queries, more than 1 % over the budget {budget}")
    return RunResult(iterations=it, counters=counters, final_eval=final_eval)


def prompt_names(spec: dict) -> list[str]:
    """The names of the prompt ids (the task's ``prompts.names``; at full scale its prompt list)."""
    p = spec.get("prompts") or {}
    if p.get("names"):
        return [str(n) for n in p["names"]]
    return fullscale.load_prompts(p["list"]) if p.get("list") else []


def row_chunks(batch, max_rows: int, total_rows: int | None = None):
    """[(micro-batch, its share of the rows)]: the batch's training rows in contiguous chunks of at most
    `max_rows` (0: the whole batch), each weighted by its share of `total_rows` (default: the batch's;
    with N processes: the rows of all of them). Σ share·loss(chunk) is the batch loss when the loss is
    a mean over rows (per-element means ⟨·⟩ and sample means are); its gradient is accumulated chunk by
    chunk (and, with N processes, summed over them)."""
    R = len(batch.rows)
    total = R if total_rows is None else int(total_rows)
    if (not max_rows or R <= max_rows) and total == R:
        return [(batch, 1.0)]
    if not max_rows or R <= max_rows:
        return [(batch, R / total)]
    return [(batch.select_rows(idx), len(idx) / total) for idx in torch.arange(R).split(max_rows)]


def _stat(v) -> float:
    return float(v.detach().double().mean()) if torch.is_tensor(v) else float(v)


def _check_finite(name: str, v: torch.Tensor, it: int) -> None:
    if not torch.isfinite(v.detach()).all():
        bad = "NaN" if torch.isnan(v.detach()).any() else "inf"
        raise Diverged(f"{name} is {bad} at iteration {it}; the run is stopped", it)


class Guard:
    """The task's sane ranges (``divergence:``): {reward: [lo, hi], kl: hi, loss: hi} bound the train
    and eval reward means, the eval path KL and |train loss|; a value outside, or a non-finite one,
    is a divergence."""

    CHECKS = (("train/reward_mean", "reward"), ("eval/reward_mean", "reward"), ("eval/kl_ref", "kl"),
              ("train/loss", "loss"))

    def __init__(self, ranges: dict):
        self.ranges = ranges

    def __call__(self, metrics: dict, it: int) -> None:
        for key, name in self.CHECKS:
            if key not in metrics:
                continue
            v = float(metrics[key])
            if not math.isfinite(v):
                raise Diverged(f"{key} is {v} at iteration {it}; the run is stopped", it)
            if name not in self.ranges:
                continue
            lo, hi = self.ranges[name] if name == "reward" else (-math.inf, self.ranges[name])
            if name == "loss":
                v = abs(v)
            if not lo <= v <= hi:
                raise Diverged(f"{key} = {float(metrics[key]):.4g} left the task's range of {name} at iteration "
                               f"{it}; the run is stopped", it)


@torch.no_grad()
def _approx_kl(process, net, behaviour, batch, cfg_scale, chunk_rows: int = 0) -> tuple[float, int]:
    """(Σ, count) of the per-step KL(p_θ ‖ p_θ†) per element over the batch's stochastic rows, after the
    update: their mean is the logged ``train/approx_kl`` (nan without stochastic rows)."""
    rows = batch.rows
    keep = getattr(rows, "stochastic", None)
    if keep is None or getattr(rows, "mean", None) is None or not bool(keep.any()):
        return 0.0, 0
    rows = rows.select(torch.nonzero(keep).flatten())
    pol, kls = Policy(net, process, cfg_scale), []
    for idx in torch.arange(len(rows)).split(chunk_rows or len(rows)):  # bounded memory at full scale
        r = rows.select(idx)
        kls.append(process.kl(process.mean(r.x, pol(r.x, r.step, r.cond), r.step), r.mean, r.step))
    kl = torch.cat(kls)
    return kl.double().sum().item(), len(kl)

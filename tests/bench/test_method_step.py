"""One optimizer step, original loss vs RSM instance, for every registered method (first process).

Setting: the equivalence harness's toy (rsmbench.harness.equivalence.build_context: 2-D time-MLP, 8 steps,
2 prompts × 4 seeds, CFG 1.5), float32, one fixed batch per method; a step is zero_grad → loss
(the RSM side includes building its spec: Ψ̂, γ, C1, C2) → backward → Adam.step. Goal: RSM ≤ 1.0×
the original's time (median over methods). The summary table times both sides
interleaved (original, RSM, original, …; 60 rounds each) and takes each side's minimum: on a shared
CPU a median or separate runs mostly measure the other processes.

Peak memory: torch.profiler (profile_memory=True) over one step; the peak of the running sum of
every event's self CPU allocation (allocations minus frees) in start-time order — bytes allocated by
torch tensors during the step, not RSS. Stored in the benchmark's extra_info; a side-by-side table
(with the median RSM/original time ratio) is written to results/bench_method_step.md at the end.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rsmbench.core.method import get, load_all
from rsmbench.core.rsm import rsm_loss
from rsmbench.harness import equivalence

REG = load_all()
CASES = [(m, REG[m].processes[0]) for m in sorted(REG)]
RESULTS: dict = {}


def peak_alloc_bytes(fn) -> int:
    """Peak of net torch CPU allocations during fn() (torch.profiler, profile_memory=True)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    run = peak = 0
    for e in events:
        run += e.self_cpu_memory_usage
        peak = max(peak, run)
    return peak


def make_step(method: str, process: str, form: str):
    m = get(method)
    ctx = equivalence.build_context(m, process, torch.float32)
    batch = equivalence.collect(m, ctx)
    params = [p for p in ctx.policy.net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        if form == "original":
            loss = m.original_loss(batch, ctx)
        else:
            loss = rsm_loss(ctx.policy, ctx.ref, m.rsm_spec(batch, ctx))
        loss.backward()
        opt.step()

    return step


def interleaved_min(step_a, step_b, rounds: int = 60) -> tuple[float, float]:
    """Minimum seconds of each step over `rounds` alternating calls (a, b, a, b, …): both sides see
    the same load, which a shared CPU makes necessary for a fair ratio."""
    ta, tb = [], []
    for _ in range(rounds):
        for step, acc in ((step_a, ta), (step_b, tb)):
            t0 = time.perf_counter()
            step()
            acc.append(time.perf_counter() - t0)
    return min(ta), min(tb)


@pytest.mark.parametrize("form", ["original", "rsm"])
@pytest.mark.parametrize("method,process", CASES)
def test_method_step(benchmark, method, process, form):
    torch.set_num_threads(2)
    step = make_step(method, process, form)
    step()  # warm-up outside the profiler
    peak = peak_alloc_bytes(step)
    benchmark.group = f"{method}/{process}"
    benchmark.extra_info.update(peak_alloc_bytes=peak, method=method, process=process, form=form)
    benchmark.pedantic(step, rounds=40, iterations=1, warmup_rounds=3)
    RESULTS[(method, process, form)] = peak
    if form == "rsm":  # the summary's side-by-side times: interleaved with a fresh original step
        other = make_step(method, process, "original")
        other()
        t_o, t_r = interleaved_min(other, step)
        benchmark.extra_info.update(interleaved_min_original_s=t_o, interleaved_min_rsm_s=t_r)
        RESULTS[(method, process, "times")] = (t_o, t_r)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    rows, ratios = [], []
    for method, process in CASES:
        o, r = RESULTS.get((method, process, "original")), RESULTS.get((method, process, "rsm"))
        t = RESULTS.get((method, process, "times"))
        if o is None or r is None or t is None:
            continue
        ratios.append(t[1] / t[0])
        rows.append(f"| {method} | {process} | {t[0] * 1e3:.2f} | {t[1] * 1e3:.2f} | {t[1] / t[0]:.2f}× "
                    f"| {o / 2**10:.0f} | {r / 2**10:.0f} |")
    if not rows:
        return
    out = Path(os.environ.get("RSMBENCH_RESULTS", "results")) / "bench_method_step.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("| method | process | original min ms | RSM min ms | RSM/orig | orig peak KiB | RSM peak KiB |\n"
                   "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
                   + f"\n\nmedian RSM/original time ratio over {len(ratios)} methods: "
                     f"{statistics.median(ratios):.2f}×\n")

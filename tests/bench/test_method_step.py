"""One optimizer step, original loss vs RSM instance, for every registered method (first process).

Setting: the equivalence harness's toy (rsmbench.equivalence.build_context: 2-D time-MLP, 8 steps,
2 prompts × 4 seeds, CFG 1.5), float32, one fixed batch per method; a step is zero_grad → loss
(the RSM side includes building its spec: Ψ̂, γ, C1, C2) → backward → Adam.step. Goal: RSM ≤ 1.0×
the original's time (median over methods). The summary uses each side's *minimum* over 40
rounds: on a shared CPU the median mostly measures other processes.

Peak memory: torch.profiler (profile_memory=True) over one step; the peak of the running sum of
every event's self CPU allocation (allocations minus frees) in start-time order — bytes allocated by
torch tensors during the step, not RSS. Stored in the benchmark's extra_info; a side-by-side table
(with the median RSM/original time ratio) is written to results/bench_method_step.md at the end.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rsmbench import equivalence
from rsmbench.method import get, load_all
from rsmbench.rsm import rsm_loss

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
    RESULTS[(method, process, form)] = (benchmark.stats.stats.min, peak)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    rows, ratios = [], []
    for method, process in CASES:
        o, r = RESULTS.get((method, process, "original")), RESULTS.get((method, process, "rsm"))
        if o is None or r is None:
            continue
        ratios.append(r[0] / o[0])
        rows.append(f"| {method} | {process} | {o[0] * 1e3:.2f} | {r[0] * 1e3:.2f} | {r[0] / o[0]:.2f}× "
                    f"| {o[1] / 2**10:.0f} | {r[1] / 2**10:.0f} |")
    if not rows:
        return
    out = Path(os.environ.get("RSMBENCH_RESULTS", "results")) / "bench_method_step.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("| method | process | original min ms | RSM min ms | RSM/orig | orig peak KiB | RSM peak KiB |\n"
                   "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
                   + f"\n\nmedian RSM/original time ratio over {len(ratios)} methods: "
                     f"{statistics.median(ratios):.2f}×\n")

"""Gradient accumulation over row chunks (``train.micro_rows``; with N processes each holds a chunk)
must give the whole batch's gradient: per-row data (``Batch.row_data``) is split with the rows and every
loss is a mean over rows. float64; tolerance 1e-12 relative (norm-wise max), both formulations."""
import pytest
import torch

from rsmbench.core import method as registry
from rsmbench.core import rsm
from rsmbench.harness import equivalence as E
from rsmbench.run.train import row_chunks

CASES = [(mid, kind) for mid, m in sorted(registry.load_all().items()) for kind in m.processes]


def _loss(m, ctx, batch, formulation):
    if formulation == "original":
        return m.original_loss(batch, ctx)
    return rsm.rsm_loss(ctx.policy, ctx.ref, m.rsm_spec(batch, ctx))


@pytest.mark.parametrize("formulation", ["original", "rsm"])
@pytest.mark.parametrize("mid,kind", CASES)
def test_row_chunks_accumulate_to_the_batch_gradient(mid, kind, formulation):
    m = registry.get(mid)
    ctx = E.build_context(m, kind)
    batch = E.collect(m, ctx)
    params = [p for p in ctx.policy.net.parameters() if p.requires_grad]
    g_full = E.flat_grad(_loss(m, ctx, batch, formulation), params)
    chunks = row_chunks(batch, 5)  # 5 does not divide any method's row count here: uneven last chunk
    assert len(chunks) > 1 and abs(sum(f for _, f in chunks) - 1.0) < 1e-15
    g_chunked = E.flat_grad(sum(f * _loss(m, ctx, mb, formulation) for mb, f in chunks), params)
    assert g_full.abs().max() > 0
    assert ((g_full - g_chunked).abs().max() / g_full.abs().max()).item() < 1e-12


def test_row_chunks_split_per_row_data():
    m = registry.get("adjoint_matching")
    ctx = E.build_context(m, "flow")
    batch = E.collect(m, ctx)
    R = len(batch.rows)
    parts = [mb for mb, _ in row_chunks(batch, R // 4)]
    assert [len(p.rows) for p in parts] == [R // 4] * 4
    assert [f for _, f in row_chunks(batch, R // 4, total_rows=2 * R)] == [1 / 8] * 4  # a share of N processes
    for p in parts:
        assert len(p.row_data["lean_adjoint"]) == len(p.rows)
    assert torch.equal(torch.cat([p.row_data["lean_adjoint"] for p in parts]),
                       batch.row_data["lean_adjoint"])


@pytest.mark.parametrize("mid", ["draft", "alignprop"])
def test_whole_chain_losses_are_never_row_chunked(mid, tmp_path):
    """DRaFT's and AlignProp's original loss replays every sample's chain whatever rows it is given, so a
    row chunk costs a whole replay and a reward query per sample: a shapes run with 24 samples, up to 10
    trained steps and micro_rows 128 queried the reward 3 times per sample in one iteration (234 of a 210
    budget). Their runs spend exactly the probed 2 queries per sample with any micro_rows."""
    from rsmbench.run import tasks
    from rsmbench.run.runspec import run_spec
    from rsmbench.run.train import train_run
    from tests.bench_helpers import tiny_overrides

    m = registry.get(mid)
    assert "original" in m.whole_chain_formulations and "rsm" not in m.whole_chain_formulations
    ctx = E.build_context(m, "flow")
    batch = E.collect(m, ctx)
    params = [p for p in ctx.policy.net.parameters() if p.requires_grad]
    some = batch.select_rows(torch.arange(min(2, len(batch.rows))))
    g_all, g_some = E.flat_grad(m.original_loss(batch, ctx), params), E.flat_grad(m.original_loss(some, ctx), params)
    assert torch.equal(g_all, g_some)  # the rows do not enter: chunking could only repeat the work
    over = tiny_overrides(tmp_path, iterations=3) + ["train.micro_rows=3", f"methods.{mid}.k=10"]
    if mid == "alignprop":
        over.append("methods.alignprop.truncation=fixed")
    res = train_run(run_spec(tasks.load("gmm", over), mid, "original", "flow", 0), lambda *a: None)
    # budget 24 = 12 samples × (collect + loss); chunked, each of the ≥ 27 chunks of 80 rows would query all
    # 8 samples again and the run would stop as overspent
    assert res.counters.reward_queries == 24 and res.iterations == 2

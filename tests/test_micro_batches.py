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

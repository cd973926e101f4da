"""Reward-backprop family on images: one optimizer step, original vs RSM instance, time and peak
memory; and the Jacobian-free RSM first-order step (rsm_fo) vs full-chain DRaFT backprop.

Setting: tiny class-conditioned diffusers UNet (3×8×8, blocks (8, 16)), 6 sampler steps, B = 2,
CFG 1.5, float32, smooth image reward, one fixed batch per method (collection not timed; rsm_fo's
terminal ∇r is computed there, at sampling time, as in the paper). A step is zero_grad → loss (the
RSM side includes building its spec: adjoint VJPs for DRaFT/AlignProp, lean adjoint in
prepare for Adjoint Matching) → backward → Adam.step. Peak memory: torch.profiler net allocations
(``tests.bench.test_method_step.peak_alloc_bytes``). Table → results/bench_fo_cost.md.
Single-threaded: on the shared 2-core build machine two intra-op threads waited on each other and
medians reached 7× the minimum; one thread gives stable, comparable numbers for these tiny nets.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rsmbench.core.method import Context, get
from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.process import make_process
from rsmbench.core.rsm import rsm_loss
from tests.bench.test_method_step import peak_alloc_bytes

B, STEPS, SHAPE = 2, 6, (3, 8, 8)
NET = dict(sample_size=8, channels=3, block_out_channels=(8, 16), norm_num_groups=4, num_classes=2)
# (method, process, hp): DRaFT with full-chain backprop is the reference point for rsm_fo
CASES = [("draft", "diffusion", {"k": None}), ("draft", "diffusion", {"k": 1}),
         ("alignprop", "diffusion", {"k_seed": 3}), ("refl", "diffusion", {}),
         ("adjoint_matching", "flow", {}), ("rsm_fo", "diffusion", {}), ("rsm_fo", "flow", {})]
RESULTS: dict = {}


def image_reward(x, cond=None):
    return -0.5 * ((x - 0.3) ** 2).mean(dim=(1, 2, 3)) + torch.sin(2 * x[:, 0]).mean(dim=(1, 2))


def make_step(method, process, hp, form):
    torch.set_num_threads(1)  # see module docstring
    m = get(method)
    p = make_process(process, num_steps=STEPS)
    net = build_net("unet", p.prediction, seed=0, **NET)
    ref = frozen_copy(build_net("unet", p.prediction, seed=1, **NET))
    ctx = Context(process=p, policy=Policy(net, p, 1.5), ref=Policy(ref, p, 1.5),
                  behaviour=Policy(frozen_copy(net), p, 1.5), reward=image_reward, hp=m.hparams(**hp), shape=SHAPE)
    cond = torch.arange(B) % 2
    batch = m.collect(ctx, cond, list(range(B)))
    m.prepare(batch, ctx)
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        if form == "original":
            loss = m.original_loss(batch, ctx)
        else:
            loss = rsm_loss(ctx.policy, ctx.ref, m.rsm_spec(batch, ctx))
        loss.backward()
        opt.step()

    return step


def _label(method, hp):
    return method + ("" if "k" not in hp else f"(K={'all' if hp['k'] is None else hp['k']})")


@pytest.mark.parametrize("form", ["original", "rsm"])
@pytest.mark.parametrize("method,process,hp", CASES, ids=[f"{_label(m, h)}-{p}" for m, p, h in CASES])
def test_fo_step(benchmark, method, process, hp, form):
    step = make_step(method, process, hp, form)
    step()
    peak = peak_alloc_bytes(step)
    benchmark.group = f"fo/{_label(method, hp)}/{process}"
    benchmark.extra_info.update(peak_alloc_bytes=peak, form=form)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    RESULTS[(_label(method, hp), process, form)] = (benchmark.stats.stats.median, peak)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    lines = []
    for method, process, hp in CASES:
        key = (_label(method, hp), process)
        o, r = RESULTS.get(key + ("original",)), RESULTS.get(key + ("rsm",))
        if o and r:
            lines.append(f"| {key[0]} | {process} | {o[0] * 1e3:.1f} | {r[0] * 1e3:.1f} | {r[0] / o[0]:.2f}× "
                         f"| {o[1] / 2**20:.1f} | {r[1] / 2**20:.1f} |")
    if not lines:
        return
    text = ("| method | process | original ms | RSM ms | RSM/orig | orig peak MiB | RSM peak MiB |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    full = RESULTS.get(("draft(K=all)", "diffusion", "original"))
    fo = RESULTS.get(("rsm_fo", "diffusion", "rsm"))
    if full and fo:
        text += (f"\nrsm_fo (Jacobian-free, RSM form) / full-chain DRaFT (original): time {fo[0] / full[0]:.3f}×, "
                 f"peak memory {fo[1] / full[1]:.3f}×\n")
    out = Path(os.environ.get("RSMBENCH_RESULTS", "results")) / "bench_fo_cost.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)

"""ddpo's original against kvablack/ddpo-pytorch@1958463 (scripts/train.py, ddpo_pytorch/stat_tracking.py,
ddpo_pytorch/diffusers_patch/ddim_with_logprob.py, config/base.py, config/dgx.py). Tolerance 1e-10
relative (tests/conformance/zo_common.py)."""
from collections import deque

import numpy as np
import pytest
import torch

from rsmbench.core.method import get
from rsmbench.harness import equivalence
from tests.conformance.zo_common import (
    REL,
    assert_pinned,
    assert_sensitive,
    ddim_step,
    harness_ddim,
    move,
    np_std,
    ppo_rows,
    rel,
)

C0 = {"eps": 0.3, "clip": 0.02, "adv_clip": 1.0}  # test values (published ones pinned below)
BUFFER, MIN_COUNT = 6, 5


def tracker_advantages(batches, C):
    """ddpo_pytorch/stat_tracking.py@1958463:11-30: per prompt a deque(maxlen=buffer_size) of its rewards;
    below min_count the whole batch's np.mean/np.std, else the history's; std + 1e-6. One call per batch."""
    stats, out = {}, None
    for prompts, rewards in batches:
        p, r = prompts.numpy(), rewards.numpy()
        out = np.empty_like(r)
        for q in np.unique(p):
            stats.setdefault(q, deque(maxlen=BUFFER)).extend(r[p == q])
            src = r if len(stats[q]) < MIN_COUNT else np.array(stats[q])
            out[p == q] = (r[p == q] - src.mean()) / (np_std(src) + C["eps"])
    return torch.as_tensor(out)


def ddpo_loss(ctx, batch, adv, C):
    """scripts/train.py@1958463:539-551: A = clamp(advantages, ±adv_clip_max), ρ = exp(log_prob −
    old log_prob), mean of max(−A·ρ, −A·clamp(ρ, 1 ± clip_range)) over the transitions (all of them at
    timestep_fraction 1.0, config/base.py:90)."""
    rows = batch.rows
    _, _, lp = ddim_step(harness_ddim(), rows.step, rows.x, ctx.policy(rows.x, rows.step, rows.cond), rows.x_next)
    A = torch.clamp(adv[rows.sample], -C["adv_clip"], C["adv_clip"])
    return ppo_rows(A, torch.exp(lp - rows.log_prob), C["clip"]).mean()


@pytest.fixture(scope="module")
def case():
    m = get("ddpo")
    hp = {"buffer_size": BUFFER, "min_count": MIN_COUNT, "adv_eps": C0["eps"], "clip_range": C0["clip"],
          "adv_clip_max": C0["adv_clip"]}
    ctx = equivalence.build_context(m, "diffusion", torch.float64, hp=hp)
    cond = torch.arange(2).repeat_interleave(4)
    batches = []
    for it in range(2):  # the tracker persists: the second batch uses each prompt's history
        b = m.collect(ctx, cond, [it * 100 + k for k in range(8)])
        m.prepare(b, ctx)
        batches.append(b)
    move(ctx, 0.05)
    with torch.no_grad():
        return m, ctx, batches, m.original_loss(batches[-1], ctx).item()


def test_tracker_and_loss_conform(case):
    m, ctx, batches, ours = case
    adv = tracker_advantages([(b.cond, b.rewards) for b in batches], C0)
    assert rel(torch.clamp(adv, -1, 1), batches[-1].extras["advantages"]) <= REL
    assert len(m.tracker.stats[0]) == BUFFER and 0 < batches[-1].extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, ddpo_loss(ctx, batches[-1], adv, C0)) <= REL


@pytest.mark.parametrize("key", list(C0))
def test_detects_a_changed_constant(case, key):
    _, ctx, batches, ours = case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: ddpo_loss(ctx, batches[-1], tracker_advantages(
            [(b.cond, b.rewards) for b in batches], C), C), C0, [key])


def test_presets_are_the_published_configs():
    """config/base.py@1958463:85 (adv_clip_max 5), :87 (clip_range 1e-4); stat_tracking.py:24,27 (+1e-6);
    config/dgx.py:56-59 aesthetic (buffer 32, min_count 16), :33-36 compressibility (16, 16)."""
    m = get("ddpo")
    common = {"clip_range": 1e-4, "adv_clip_max": 5.0, "adv_eps": 1e-6, "per_prompt_stat_tracking": True}
    assert_pinned(m.hparams("ddpo_pytorch"), {**common, "buffer_size": 32, "min_count": 16})
    assert_pinned(m.hparams("ddpo_pytorch_compressibility"), {**common, "buffer_size": 16, "min_count": 16})

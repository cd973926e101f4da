"""branch_grpo, tempflow_grpo, rsm_zo: clipping at and after θ†, fair clip thresholds, the ODE KL
anchors, k_avg/k weights, zero-advantage masking, NFE extras and image-shaped states (float64)."""
import math

import pytest
import torch

from rsmbench.core import tree, trust
from rsmbench.core.method import Context, get
from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.process import make_process
from rsmbench.core.rsm import RSMSpec, elementwise_mean, rsm_loss
from rsmbench.harness import equivalence

PAIRS = [("branch_grpo", "diffusion"), ("tempflow_grpo", "flow"), ("rsm_zo", "diffusion"), ("rsm_zo", "flow")]


@pytest.mark.parametrize("method,process", PAIRS)
def test_clip_inactive_at_behaviour_then_binds(method, process):
    rec = equivalence.check(method, process, "float64", offpolicy_steps=1)
    first, last = rec.offpolicy[0], rec.offpolicy[-1]
    assert first["clipfrac"] == 0.0 and first["max_rel_err"] <= 1e-9  # θ = θ†: no clip binds, exact
    assert last["clipfrac"] > 0.0 and last["max_rel_err"] > 1e-6  # off-policy: clip binds, forms differ


def test_fair_clip_threshold_is_eps_over_step_variance():
    eps, var = 1e-4, torch.tensor([0.01, 0.25], dtype=torch.float64)
    adv = torch.ones(2, dtype=torch.float64)
    # A·Δ just below / above ε/σ_s² (Δ = log ρ = −neg_log_ratio)
    below = trust.fair_matching_clip(-(eps / var) * (1 - 1e-3), adv, var, eps)
    above = trust.fair_matching_clip(-(eps / var) * (1 + 1e-3), adv, var, eps)
    assert (below > 0).all() and (above == 0).all()
    assert trust.matching_clipfrac(-(eps / var) * (1 + 1e-3), adv, eps, var) == 1.0
    # unclipped, its gradient in −Δ is A (the σ_s² scale cancels), as the plain matching clip
    nlr = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    trust.fair_matching_clip(nlr, torch.tensor([0.7, -2.0], dtype=torch.float64), var, eps).sum().backward()
    torch.testing.assert_close(nlr.grad, torch.tensor([0.7, -2.0], dtype=torch.float64), rtol=0, atol=1e-15)


def _zo_batch(process, **hp):
    m = get("rsm_zo")
    ctx = equivalence.build_context(m, process, torch.float64, hp=hp)
    return m, ctx, equivalence.collect(m, ctx)


@pytest.mark.parametrize("process", ["diffusion", "flow"])
def test_kl_anchor_rows_have_zero_guidance_and_pull_to_reference(process):
    m, ctx, batch = _zo_batch(process)
    is_a, rows = batch.row_data["kl_anchor"], batch.rows
    N, B = ctx.process.num_steps, 8
    k = tree.branch_schedule(ctx.hp["k"], N)
    # flow: every zero-k, non-final root transition (train_sd3_pr.py:613-617); diffusion: ⌊0.10·#branch rows⌋
    zero_k = sum(1 for i in range(N - 1) if k[i] == 0)
    assert int(is_a.sum()) == (B * zero_k if process == "flow" else math.floor(0.10 * B * sum(k))) > 0
    anchor_steps = rows.step[is_a].tolist()
    assert all(k[i] == 0 and i < N - 1 for i in anchor_steps)
    assert not rows.stochastic[is_a].any()  # deterministic root states
    spec = m.rsm_spec(batch, ctx)
    assert torch.equal(spec.psi[is_a], torch.zeros_like(spec.psi[is_a]))
    assert spec.anchor == "ref" if process == "flow" else torch.equal(spec.anchor, is_a)
    # anchor rows alone, at a perturbed θ too (loss identity): their share of the RSM loss is the
    # anchor term β_a·mean_a(½·4.5²·⟨Δε²⟩) (diffusion) resp. β·k_avg·mean_a KL_t (flow), a mean of its own
    sub = RSMSpec(rows=rows.select(is_a), psi=spec.psi[is_a], gamma=spec.gamma[is_a], c1=spec.c1[is_a],
                  c2=spec.c2[is_a], anchor="ref")
    with torch.no_grad():
        for p in ctx.policy.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    a = sub.rows
    with torch.no_grad():
        d2 = elementwise_mean((ctx.policy(a.x, a.step, a.cond) - ctx.ref(a.x, a.step, a.cond)) ** 2)
        if process == "diffusion":
            expect = 8e-5 * (0.5 * 4.5**2 * d2).mean()
        else:
            expect = 0.004 * batch.extras["k_avg"] * (ctx.process.weight(a.step) ** 2 / 2 * d2).mean()
    loss = rsm_loss(ctx.policy, ctx.ref, sub)
    share = len(a) / len(rows)
    assert abs(share * loss.item() - expect.item()) <= 1e-12 * abs(expect.item())
    assert abs(share * loss.item() - m.anchor_coef(ctx, batch) * m._anchor_kl(ctx, a).mean().item()) \
        <= 1e-12 * abs(expect.item())
    # one gradient step on it moves o_θ toward o_ref on those rows
    def dist():
        return elementwise_mean((ctx.policy(a.x, a.step, a.cond) - ctx.ref(a.x, a.step, a.cond)) ** 2).mean()

    before = dist().item()
    params = list(ctx.policy.net.parameters())
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():  # a small normalised descent step
        for p, g in zip(params, grads):
            p.sub_(1e-4 * g / norm)
    assert dist().item() < before


def test_rsm_zo_branch_weights_masking_and_nfe():
    m, ctx, batch = _zo_batch("diffusion")
    is_a, rows, wgt = batch.row_data["kl_anchor"], batch.rows, batch.row_data["row_weight"]
    R, n_b, n_a = len(rows), int((~is_a).sum()), int(is_a.sum())
    k_avg = (3 + 2 + 3 + 2) / 4  # defaults k = [3, 2, 3, 2]
    k_row = torch.tensor([3.0, 2.0, 3.0, 2.0], dtype=torch.float64)[rows.step[~is_a]]
    torch.testing.assert_close(wgt[~is_a] * n_b / R, k_avg / k_row)  # kw, times the branch rows' share R/n_b
    torch.testing.assert_close(wgt[is_a], torch.full((n_a,), R / n_a, dtype=torch.float64))
    N, B = ctx.process.num_steps, 8
    hand = 8 + 10 + (3 * 7 + 2 * 6 + 3 * 5 + 2 * 4)  # N + Σk + Σk(N − i − 1)
    assert batch.extras["nfe"] == B * tree.nfe_localised([3, 2, 3, 2], N) == B * hand
    assert batch.extras["nfe_cfg"] == 2 * batch.extras["nfe"] and batch.extras["reward_queries"] == B * 10
    # a prompt whose reward is constant: its groups have zero spread, A = 0, its rows are masked
    flat = lambda x, c: torch.where(c == 0, torch.ones(len(x), dtype=x.dtype), equivalence.toy_reward(x))  # noqa: E731
    ctx.reward = flat
    b2 = equivalence.collect(m, ctx)
    kept = b2.rows.select(~b2.row_data["kl_anchor"])
    assert len(kept) == B * 10 // 2 and (kept.cond == 1).all()
    # every reward constant: every A = 0, and all rows are kept (train_grpo_pr.py:1646-1648)
    ctx.reward = lambda x, c: torch.ones(len(x), dtype=x.dtype)
    b3 = equivalence.collect(m, ctx)
    assert int((~b3.row_data["kl_anchor"]).sum()) == B * 10


def _image_context(m, kind, hp=None):
    process = make_process(kind, num_steps=3)
    kw = dict(sample_size=8, channels=3, block_out_channels=(16, 32), norm_num_groups=8, num_classes=2)
    net = build_net("unet", process.prediction, seed=0, dtype=torch.float64, **kw)
    ref = frozen_copy(build_net("unet", process.prediction, seed=1, dtype=torch.float64, **kw))
    return Context(process=process, policy=Policy(net, process, 1.5), ref=Policy(ref, process, 1.5),
                   behaviour=Policy(frozen_copy(net), process, 1.5), reward=lambda x, c: -(x**2).mean(dim=(1, 2, 3)),
                   hp=m.hparams(**(hp or {})), shape=(3, 8, 8))


@pytest.mark.parametrize("method,kind,hp", [("branch_grpo", "flow", {"split_steps": [1], "ks": [2]}),
                                            ("tempflow_grpo", "flow", {"k": [2, 2]}),
                                            ("rsm_zo", "diffusion", {"k": [2, 2], "anchor_ratio": 0.5})])
def test_image_shaped_states(method, kind, hp):
    m = get(method)
    ctx = _image_context(m, kind, hp)
    batch = m.collect(ctx, torch.tensor([0, 0, 1, 1]), [1, 2, 3, 4])
    m.prepare(batch, ctx)
    assert batch.rows.x.shape[1:] == (3, 8, 8)
    g_o, g_r, _, _ = equivalence.both_gradients(m, batch, ctx)
    assert equivalence.compare(g_o, g_r)["max_rel_err"] <= 1e-9

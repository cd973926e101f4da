"""rsm_zo's original against the official RSM code (jaylee2000/rsm@e8be3df): flow
sd35_zeroth_order/scripts/train_sd3_pr.py (matching loss, fair_clip2, ODE KL anchors), diffusion
sd15_zeroth_order/train_grpo_pr.py (uw-sigma matching, ODE KL anchors). Tolerance 1e-10 relative
(tests/conformance/zo_common.py)."""
import math

import numpy as np
import pytest
import torch

from rsmbench.core.method import get
from tests.conformance.zo_common import (
    REL,
    assert_pinned,
    assert_sensitive,
    ddim_step,
    flow_grpo_sde,
    flow_sigmas,
    harness_ddim,
    np_std,
    rel,
    toy,
)

K = [3, 2, 3, 2]


def branch_advantages(batch, by_prompt: bool, C):
    """Leaves standardised within (root seed | prompt, branch step), population std + 1e-4, clamped ±5."""
    tree, leaves = batch.extras["tree"], batch.extras["leaves"]
    first = (tree.cond if by_prompt else tree.root)[leaves].numpy()
    key = np.stack([first, tree.start[leaves].numpy()], 1)
    r, adv = batch.rewards.numpy(), np.zeros(tree.num_nodes)
    for g in np.unique(key, axis=0):
        m = (key == g).all(1)
        adv[leaves.numpy()[m]] = (r[m] - r[m].mean()) / (np_std(r[m]) + C["eps"])
    return torch.clamp(torch.as_tensor(adv), -5.0, 5.0)


FLOW = {"clip": 0.05, "beta": 0.5, "eps": 0.3, "a": 0.7, "two": 2.0, "half": 0.5}


def flow_loss(ctx, batch, C):
    """train_sd3_pr.py@e8be3df:1713-1769 (``--loss matching --reweight fairclip2``): w^b = √Δt/σ̃·(1 +
    (1 − t)/(2t)·σ̃²) (sd3_train_shared.py:52-62, :124-126); term = (½⟨(w^bΔv)²⟩ + ⟨w^bΔv·ξ⟩)·σ̃²Δt (:136);
    per row max(0, ε|A| + A·term)·kw/(σ̃²Δt)·σ̃/√Δt; KL rows kw·⟨Δμ²⟩/(2σ̃²Δt) (:1771-1780, trick off);
    anchors (:1796-1872): at every zero-k, non-final root state, ⟨Δμ²⟩/(2σ̃²Δt)·k_avg, their own mean;
    loss = policy + β·(kl_sde + kl_anchor) (:1880-1882)."""
    tree, rows, N = batch.extras["tree"], batch.rows, ctx.process.num_steps
    br = rows.select(~batch.row_data["kl_anchor"])
    sig = flow_sigmas(N)
    A = branch_advantages(batch, False, C)[br.sample]
    k = torch.tensor(K, dtype=torch.float64)
    k_avg = k.mean()
    kw = k_avg / k[br.step]
    v = ctx.policy(br.x, br.step, br.cond)
    mu, std, _ = flow_grpo_sde(sig, br.step, br.x, v, br.x_next, C["a"])
    mu_ref, _, _ = flow_grpo_sde(sig, br.step, br.x, ctx.ref(br.x, br.step, br.cond), br.x_next, C["a"])
    st, t, dt = std.reshape(-1), sig[br.step], sig[br.step] - sig[br.step + 1]
    wb = (torch.sqrt(dt) / st * (1 + (1 - t) / (2 * t) * st**2))[:, None]
    d = v - br.out_behaviour
    term = (C["half"] * ((wb * d) ** 2).mean(1) + (wb * d * br.noise).mean(1)) * st**2 * dt
    policy = torch.clamp(C["clip"] * A.abs() + A * term, min=0) * kw / (st**2 * dt) * (st / torch.sqrt(dt))
    kl_sde = kw * ((mu - mu_ref) ** 2).mean(1) / (C["two"] * st**2 * dt)
    root = tree.segments[0]
    idx = [(b, i) for b in range(root.batch_size) for i in range(N - 1) if i >= len(K) or K[i] == 0]
    b_, i_ = torch.tensor([p[0] for p in idx]), torch.tensor([p[1] for p in idx])
    xa, ca = root.states[b_, i_], root.cond[b_]
    ma, sa, _ = flow_grpo_sde(sig, i_, xa, ctx.policy(xa, i_, ca), xa, C["a"])
    ma_ref, _, _ = flow_grpo_sde(sig, i_, xa, ctx.ref(xa, i_, ca), xa, C["a"])
    kl_anchor = (((ma - ma_ref) ** 2).mean(1) / (C["two"] * sa.reshape(-1) ** 2 * (sig[i_] - sig[i_ + 1])) * k_avg)
    return policy.mean() + C["beta"] * (kl_sde.mean() + kl_anchor.mean()), len(idx)


@pytest.fixture(scope="module")
def flow_case():
    m, ctx, batch = toy("rsm_zo", "flow", {"k": K, "clip_range": FLOW["clip"], "beta": FLOW["beta"],
                                            "adv_eps": FLOW["eps"]}, shift=0.3)
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


def test_flow_loss_and_anchors_conform(flow_case):
    ctx, batch, ours = flow_case
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        theirs, n_anchor = flow_loss(ctx, batch, FLOW)
        assert int(batch.row_data["kl_anchor"].sum()) == n_anchor == 8 * 3  # zero-k steps 4, 5, 6 of 8, per root
        assert rel(ours, theirs) <= REL


@pytest.mark.parametrize("key", list(FLOW))
def test_flow_detects_a_changed_constant(flow_case, key):
    ctx, batch, ours = flow_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: flow_loss(ctx, batch, C)[0], FLOW, [key])


DIFF = {"const_weight": 4.5, "weight_scale_factor": 8.70575076181, "clip": 0.05, "anchor_beta": 0.5, "eps": 300.0,
        "ratio": 0.10}  # test ε: the toy's diffusion rewards are O(1e3)


def diffusion_loss(ctx, batch, C):
    """train_grpo_pr.py@e8be3df:2003-2039 (``noise_matching_precision: bad``, κ = const_weight/
    weight_scale_factor, max(0, ε|A| + A·term)·kw, mean over the kept rows); anchors :1652-1668 (at most
    int(#rows·anchor_row_max_ratio), at least 1) and :2094-2125 (½·const_weight²·⟨(ε_θ − ε_ref)²⟩, their own
    mean, × ode_kl_anchor_beta). The anchor rows are a random subset: theirs take ours as the input."""
    rows, is_a = batch.rows, batch.row_data["kl_anchor"]
    br, an = rows.select(~is_a), rows.select(is_a)
    A = branch_advantages(batch, True, C)[br.sample]
    k = torch.tensor(K, dtype=torch.float64)
    kw = k.mean() / k[br.step]
    kap = C["const_weight"] / C["weight_scale_factor"]
    d = ctx.policy(br.x, br.step, br.cond) - br.out_behaviour
    term = 0.5 * ((kap * d) ** 2).mean(1) + (kap * d * br.noise).mean(1)
    policy = torch.clamp(C["clip"] * A.abs() + A * term, min=0) * kw
    da = ctx.policy(an.x, an.step, an.cond) - ctx.ref(an.x, an.step, an.cond)
    anchor = 0.5 * C["const_weight"] ** 2 * (da**2).mean(1)
    n_total = 8 * sum(K)
    return policy.mean() + C["anchor_beta"] * anchor.mean(), max(1, int(n_total * C["ratio"]))


@pytest.fixture(scope="module")
def diff_case():
    m, ctx, batch = toy("rsm_zo", "diffusion", {"k": K, "clip_range": DIFF["clip"], "anchor_beta": DIFF["anchor_beta"],
                                                 "adv_eps": DIFF["eps"]})
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


def test_diffusion_loss_and_anchors_conform(diff_case):
    ctx, batch, ours = diff_case
    tree, rows, is_a = batch.extras["tree"], batch.rows, batch.row_data["kl_anchor"]
    an = rows.select(is_a)
    root = tree.segments[0]
    assert all(K[i] == 0 if i < len(K) else True for i in an.step.tolist()) and (an.step < 7).all()
    assert torch.equal(an.x, root.states[an.sample, an.step])  # ODE root states
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        theirs, n_anchor = diffusion_loss(ctx, batch, DIFF)
        assert int(is_a.sum()) == n_anchor == math.floor(0.10 * 8 * 10)
        assert rel(ours, theirs) <= REL


@pytest.mark.parametrize("key", ["const_weight", "weight_scale_factor", "clip", "anchor_beta", "eps"])
def test_diffusion_detects_a_changed_constant(diff_case, key):
    ctx, batch, ours = diff_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: diffusion_loss(ctx, batch, C)[0], DIFF, [key])


def test_diffusion_anchor_term_uses_the_constant_weight_not_ddpm_w(diff_case):
    """kl_weight_t = const_weight (train_grpo_pr.py:2094-2100), not the DDPM inference weight w_t."""
    ctx, batch, _ = diff_case
    an = batch.rows.select(batch.row_data["kl_anchor"])
    with torch.no_grad():
        mu, _, _ = ddim_step(harness_ddim(), an.step, an.x, ctx.policy(an.x, an.step, an.cond), an.x)
        got = get("rsm_zo")._anchor_kl(ctx, an)
        d = ctx.policy(an.x, an.step, an.cond) - ctx.ref(an.x, an.step, an.cond)
        assert rel(got, 0.5 * 4.5**2 * (d**2).mean(1)) <= REL
        assert rel(got, ctx.process.kl(mu, ddim_step(harness_ddim(), an.step, an.x, ctx.ref(an.x, an.step, an.cond),
                                                     an.x)[0], an.step)) > 1e-3


def test_presets_are_the_official_configs():
    """base_grpo_pr_uwsigma_lora10.yaml@e8be3df (const_weight 4.5, weight_scale_factor 8.70575076181,
    ode_kl_anchor_beta 0.00008, anchor_row_max_ratio 0.10, train_clip_range 1e-4, train_adv_clip_max 5.0);
    sd35: config/sd3_reward_presets.py:32 (beta 0.004), :165 (heuristic off), config/base.py:96-98."""
    m = get("rsm_zo")
    assert_pinned(m.hparams("sd15_ours"), {"const_weight": 4.5, "weight_scale": 8.70575076181, "anchor_beta": 8e-5,
                                           "anchor_ratio": 0.10, "clip_range": 1e-4, "adv_clip_max": 5.0,
                                           "beta": 0.0, "group_strategy": "prompt"})
    assert_pinned(m.hparams("sd35_lowsnr2"), {"beta": 0.004, "heuristic_kldenom": False, "anchor_ratio": "all",
                                              "clip_range": 1e-4, "adv_clip_max": 5.0, "group_strategy": "seed",
                                              "k": [6, 6, 8, 10, 0, 0, 0, 0, 0, 0]})

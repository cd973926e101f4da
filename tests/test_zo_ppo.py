"""Zeroth-order PPO family (ddpo, grpo, pcpo, pcpo_reweight, grpo_guard, dpok): the shared trust-region
and advantage code against hand-computed values, clipping on/off policy, the β > 0 GRPO branch, the
two PCPO forms, DPOK's attributable gap, and image-shaped states. Tolerances: float64, 1e-9 relative
(the harness's TOL) for every exact claim."""
import pytest
import torch

from rsmbench.core import trust
from rsmbench.core.advantages import PerPromptStatTracker, clip_advantages, per_prompt_advantages
from rsmbench.core.method import Context, get
from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.process import make_process
from rsmbench.harness import equivalence

CLIPPED = [("ddpo", "diffusion"), ("grpo", "flow"), ("pcpo", "diffusion"), ("pcpo_reweight", "flow"),
           ("grpo_guard", "flow"), ("dpok", "diffusion")]
T = torch.tensor


# ---- advantages -------------------------------------------------------------------------------------
def test_tracker_min_count_falls_back_to_batch_stats_then_uses_buffer():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3, eps=0.0)
    a1 = tr.update([0, 0, 1], T([1.0, 2.0, 3.0], dtype=torch.float64))
    # every prompt has < 3 rewards: batch mean 2, batch population std √(2/3)
    assert torch.allclose(a1, (T([1.0, 2.0, 3.0], dtype=torch.float64) - 2) / (2 / 3) ** 0.5, atol=1e-12)
    a2 = tr.update([0, 0, 1], T([3.0, 4.0, 5.0], dtype=torch.float64))
    # prompt 0: history [1,2,3,4] (buffer 4 keeps all), mean 2.5, std √1.25
    assert torch.allclose(a2[:2], (T([3.0, 4.0], dtype=torch.float64) - 2.5) / 1.25**0.5, atol=1e-12)
    # prompt 1: history [3, 5] has 2 < 3 rewards → this batch's stats: mean 4, std √(2/3)
    assert abs(a2[2].item() - 1 / (2 / 3) ** 0.5) < 1e-12
    tr.update([0], T([10.0], dtype=torch.float64))
    assert list(tr.stats[0]) == [2.0, 3.0, 4.0, 10.0]  # buffer evicts the oldest


def test_tracker_global_std_and_flow_grpo_form():
    r = T([1.0, 3.0, 10.0, 14.0], dtype=torch.float64)
    a = per_prompt_advantages(r, T([0, 0, 1, 1]), adv_clip_max=None, global_std=True, eps=0.0)
    std = r.std(unbiased=False)  # 5.3151...
    assert torch.allclose(a, T([-1.0, 1.0, -2.0, 2.0], dtype=torch.float64) / std, atol=1e-12)
    a = per_prompt_advantages(r, T([0, 0, 1, 1]), adv_clip_max=None, eps=1e-4)
    assert torch.allclose(a, T([-1 / 1.0001, 1 / 1.0001, -2 / 2.0001, 2 / 2.0001], dtype=torch.float64), atol=1e-12)
    assert clip_advantages(T([-7.0, 0.5, 6.0]), 5.0).tolist() == [-5.0, 0.5, 5.0]


# ---- trust-region functions -----------------------------------------------------------------------------
def test_ppo_clip_values_symmetric_and_asymmetric():
    ratio, A = T([0.5, 1.0, 1.5, 1.5]), T([1.0, 1.0, 1.0, -1.0])
    assert trust.ppo_clip(ratio, A, 0.2).tolist() == pytest.approx([-0.5, -1.0, -1.2, 1.5])
    assert trust.ppo_clip(ratio, A, 0.2, 0.6).tolist() == pytest.approx([-0.5, -1.0, -1.5, 1.5])
    assert trust.clipfrac(ratio, 0.2).item() == 0.75 and trust.clipfrac(ratio, 0.2, 0.6).item() == 0.25
    assert trust.approx_kl(torch.log(T([1.0, 2.0]))).item() == pytest.approx(0.25 * torch.log(T(2.0)).item() ** 2)


def test_logrho_and_matching_forms_share_gradients_and_clip_where_alog_rho_exceeds_eps():
    lr = T([-0.3, -1e-5, 1e-5, 0.3, 0.3, -0.3], dtype=torch.float64, requires_grad=True)
    A = T([1.0, 1.0, 1.0, 1.0, -2.0, -2.0], dtype=torch.float64)
    g1 = torch.autograd.grad(trust.logrho_clip(lr, A, 1e-4).sum(), lr)[0]
    g2 = torch.autograd.grad(trust.matching_clip(-lr, A, 1e-4).sum(), lr)[0]
    assert torch.equal(g1, g2)
    assert g1.tolist() == [-1.0, -1.0, -1.0, 0.0, 2.0, 0.0]  # zero exactly where A·log ρ > ε|A|


def test_ratio_norm_is_one_at_behaviour_and_has_its_bias_term():
    lr, msq, s = T([0.0, -0.02]), T([0.0, 0.01]), T([0.5, 0.5])
    r = trust.ratio_norm(lr, msq, s)
    assert r[0].item() == 1.0 and r[1].item() == pytest.approx(torch.exp(T(0.5 * (-0.02 + 0.01 / 0.5))).item())


# ---- clipping in the methods: inactive at θ†, binding after a step ------------------------------------------
@pytest.mark.parametrize("method,process", CLIPPED)
def test_ratio_is_one_on_policy_and_clip_binds_after_a_step(method, process):
    rec = equivalence.check(method, process, "float64", offpolicy_steps=1)
    first, after = rec.offpolicy
    assert first["clipfrac"] == 0.0 and after["clipfrac"] > 0.5, rec.offpolicy
    if rec.kind in equivalence.EXACT:
        assert first["max_rel_err"] <= 1e-9 and after["max_rel_err"] > 1e-3


def test_on_policy_log_ratio_is_zero():
    m = get("ddpo")
    ctx = equivalence.build_context(m, "diffusion")
    batch = equivalence.collect(m, ctx)
    m.original_loss(batch, ctx)
    assert batch.extras["stats"]["approx_kl"] < 1e-25 and batch.extras["stats"]["clipfrac"] == 0.0


# ---- GRPO with β·KL (Flow-GRPO) ---------------------------------------------------------------------------
@pytest.mark.parametrize("process", ["diffusion", "flow"])
def test_grpo_with_kl_anchors_on_ref_and_is_exact(process):
    rec = equivalence.check("grpo", process, "float64", hp={"beta": 0.04}, offpolicy_steps=0)
    assert rec.max_rel_err <= 1e-9 and rec.passed
    bad = equivalence.check("grpo", process, "float64", hp={"beta": 0.04}, offpolicy_steps=0,
                            perturb=lambda s, c: setattr(s, "anchor", "behaviour") or s)
    assert bad.max_rel_err > 1e-6  # the s_ref pull of the KL term is needed


# ---- PCPO forms and per-process defaults ---------------------------------------------------------------------
@pytest.mark.parametrize("method,process,form", [("pcpo", "diffusion", "matching"), ("pcpo", "flow", "matching"),
                                                 ("pcpo_reweight", "diffusion", "logrho"),
                                                 ("pcpo_reweight", "flow", "matching")])
def test_pcpo_non_default_forms_match_rsm_at_behaviour(method, process, form):
    # the default forms (pcpo: logrho; pcpo_reweight: matching on diffusion, logrho on flow) are
    # covered by tests/test_equivalence.py
    rec = equivalence.check(method, process, "float64", hp={"form": form}, offpolicy_steps=0)
    assert rec.max_rel_err <= 1e-9, rec


def test_pcpo_reweight_credit_is_uniform_on_diffusion_and_step_size_on_flow():
    m = get("pcpo_reweight")
    for process in ("diffusion", "flow"):
        ctx = equivalence.build_context(m, process)
        rows = equivalence.collect(m, ctx).rows
        k = m.kappa(ctx, rows)
        expect = (4.5 / 8.70575076181 * torch.ones(len(rows), dtype=torch.float64) if process == "diffusion"
                  else 4.3152134639895925 * ctx.process.dt[rows.step])
        assert torch.allclose(k, expect, rtol=1e-15)


# ---- DPOK: exact on fresh rows, the replayed rows are the gap ----------------------------------------------
def test_dpok_fresh_rows_are_exact_replayed_rows_are_the_gap():
    """A run's first batch (a fresh buffer) holds on-policy rows only: both formulations use the same
    r − V(x_t) and agree (1e-9). After a policy step, a second batch replays stale rows: DPOK's
    clamp(ρ, 1 ± 1e-4) zeroes them in the original, not in the RSM instance: a gap."""
    for hp in ({}, {"value_baseline": False}, {"kl_in_reward": True}, {"kl_form": "gaussian"}):
        assert equivalence.check("dpok", "diffusion", "float64", offpolicy_steps=0, hp=hp).max_rel_err <= 1e-9, hp
    m = get("dpok")
    ctx = equivalence.build_context(m, "diffusion")
    b1 = equivalence.collect(m, ctx)
    params = list(ctx.policy.net.parameters())
    g_o, g_r, _, _ = equivalence.both_gradients(m, b1, ctx)
    assert equivalence.compare(g_o, g_r)["max_rel_err"] <= 1e-9
    opt = torch.optim.Adam(params, lr=3e-2)
    opt.zero_grad()
    m.original_loss(b1, ctx).backward()
    opt.step()
    ctx.behaviour = Policy(frozen_copy(ctx.policy.net), ctx.process, ctx.policy.cfg_scale)  # the next θ†
    b2 = equivalence.collect(m, ctx, seed=1)
    assert len(m.buffer) == 2 * len(b1.rows) and m.value is not None  # one buffer, one V, across batches
    stale = b2.rows.log_prob != ctx.process.log_prob(
        b2.rows.x_next, ctx.process.mean(b2.rows.x, ctx.behaviour(b2.rows.x, b2.rows.step, b2.rows.cond),
                                         b2.rows.step), b2.rows.step)
    assert 0 < int(stale.sum()) < len(b2.rows)
    g_o, g_r, _, _ = equivalence.both_gradients(m, b2, ctx)
    assert equivalence.compare(g_o, g_r)["max_rel_err"] > 1e-3


# ---- image-shaped states: every method of this family on (B, C, H, W) ------------------------------------------
@pytest.mark.parametrize("method,process", CLIPPED[:5] + [("dpok", "diffusion")])
def test_image_states(method, process):
    m = get(method)
    p = make_process(process, num_steps=3)
    kw = dict(sample_size=8, channels=3, block_out_channels=(8, 16), norm_num_groups=4, num_classes=2)
    net = build_net("unet", p.prediction, seed=0, dtype=torch.float64, **kw)
    ref = frozen_copy(build_net("unet", p.prediction, seed=1, dtype=torch.float64, **kw))
    ctx = Context(process=p, policy=Policy(net, p, 1.5), ref=Policy(ref, p, 1.5),
                  behaviour=Policy(frozen_copy(net), p, 1.5), reward=lambda x, c: -(x**2).mean(dim=(1, 2, 3)),
                  hp=m.hparams(value_baseline=False) if method == "dpok" else m.hparams(), shape=(3, 8, 8))
    batch = m.collect(ctx, torch.tensor([0, 0, 1, 1]), [0, 1, 2, 3])
    m.prepare(batch, ctx)
    g_o, g_r, _, _ = equivalence.both_gradients(m, batch, ctx)
    assert equivalence.compare(g_o, g_r)["max_rel_err"] <= 1e-9


@pytest.mark.parametrize("method,process", [("pcpo", "diffusion"), ("pcpo_reweight", "flow")])
def test_pcpo_forms_off_policy(method, process):
    """Off θ†: both forms report the same policy log-ratio (approx_kl); for PCPO-base (κ = w_t)
    the matching term is exactly −log ρ, so the two forms keep equal gradients; for PCPO-reweight
    (κ ≠ w_t) they differ in the quadratic term, so only the first-step gradients agree."""
    m = get(method)
    ctx = equivalence.build_context(m, process)
    batch = equivalence.collect(m, ctx)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in ctx.policy.net.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    params = list(ctx.policy.net.parameters())
    grads, kls = [], []
    for form in ("logrho", "matching"):
        ctx.hp["form"] = form
        grads.append(equivalence.flat_grad(m.original_loss(batch, ctx), params))
        kls.append(batch.extras["stats"]["approx_kl"])
    assert kls[0] > 0 and abs(kls[0] - kls[1]) <= 1e-9 * kls[0]
    gap = (grads[0] - grads[1]).abs().max() / grads[0].abs().max()
    assert gap <= 1e-9 if method == "pcpo" else gap > 1e-6

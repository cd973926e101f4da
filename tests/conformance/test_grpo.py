"""grpo's original against its authors' code: Flow-GRPO (flow) and DanceGRPO (diffusion). Tolerance
1e-10 relative (tests/conformance/zo_common.py)."""
import numpy as np
import pytest
import torch

from tests.conformance.zo_common import (
    REL,
    assert_pinned,
    assert_sensitive,
    ddim_step,
    flow_grpo_sde,
    flow_sigmas,
    harness_ddim,
    np_std,
    ppo_rows,
    rel,
    toy,
)

# test values (the published ones are pinned below); each moves the loss by far more than 1e-10
FLOW = {"clip": 0.02, "beta": 0.5, "adv_clip": 1.0, "eps": 0.3, "a": 0.7, "two": 2.0, "fraction": 0.99}


def flow_grpo_loss(ctx, batch, C):
    """yifan123/flow_grpo@ac4c86e, transcribed: ``flow_grpo/stat_tracking.py`` with global_std
    (A = (r − mean_prompt r)/(np.std(all r) + 1e-4)); ``scripts/train_sd3.py``:797-817 (samples whose A
    is 0 dropped), :345/:864 (steps j < int(N·timestep_fraction)), :866-896 (per step: mean over samples of
    max(−A·ρ, −A·clamp(ρ, 1 ± clip)) with A clamped to ±adv_clip, plus β·mean(⟨(μ − μ_ref)²⟩/(2·std_dev_t²))),
    the gradient accumulated over the trained steps (:360): a mean over steps."""
    ro, N = batch.rollout, ctx.process.num_steps
    sig = flow_sigmas(N)
    r, cond = batch.rewards.numpy(), batch.cond.numpy()
    adv = np.empty_like(r)
    for p in np.unique(cond):
        adv[cond == p] = (r[cond == p] - r[cond == p].mean()) / (np_std(r) + C["eps"])
    keep = torch.as_tensor(adv != 0)
    A = torch.clamp(torch.as_tensor(adv)[keep], -C["adv_clip"], C["adv_clip"])
    n_train = int(N * C["fraction"])
    total = 0.0
    for j in range(n_train):
        x, x1, c = ro.states[keep, j], ro.states[keep, j + 1], batch.cond[keep]
        mean, std, lp = flow_grpo_sde(sig, j, x, ctx.policy(x, j, c), x1, C["a"])
        mean_ref, _, _ = flow_grpo_sde(sig, j, x, ctx.ref(x, j, c), x1, C["a"])
        ratio = torch.exp(lp - ro.log_probs[keep, j])
        kl = ((mean - mean_ref) ** 2).mean(dim=1) / (C["two"] * std.reshape(-1) ** 2)
        total = total + ppo_rows(A, ratio, C["clip"]).mean() + C["beta"] * kl.mean()
    return total / n_train


@pytest.fixture(scope="module")
def flow_case():
    hp = {"clip_range": FLOW["clip"], "beta": FLOW["beta"], "adv_clip_max": FLOW["adv_clip"], "adv_eps": FLOW["eps"],
          "timestep_fraction": FLOW["fraction"], "global_std": True, "kl_form": "flow_grpo"}
    m, ctx, batch = toy("grpo", "flow", hp)
    with torch.no_grad():
        ours = m.original_loss(batch, ctx).item()
    return m, ctx, batch, ours


def test_flow_grpo_loss_conforms(flow_case):
    """Flow-GRPO's loss (flow_grpo@ac4c86e scripts/train_sd3.py:797-896, flow_grpo/stat_tracking.py:12-33,
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:40-70): KL ⟨Δμ²⟩/(2σ̃²) with no Δt, first
    ⌊N·0.99⌋ steps, global std, zero-A samples dropped."""
    m, ctx, batch, ours = flow_case
    assert sorted(set(batch.rows.step.tolist())) == list(range(int(8 * 0.99)))  # 7 of 8 steps
    assert 0 < batch.extras["stats"]["clipfrac"] < 1  # the clip binds on some rows, not all
    with torch.no_grad():
        assert rel(ours, flow_grpo_loss(ctx, batch, FLOW)) <= REL


@pytest.mark.parametrize("key", ["clip", "beta", "adv_clip", "eps", "a", "two"])
def test_flow_grpo_loss_detects_a_changed_constant(flow_case, key):
    _, ctx, batch, ours = flow_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: flow_grpo_loss(ctx, batch, C), FLOW, [key])


def test_flow_grpo_kl_is_dt_times_the_gaussian_one(flow_case):
    """The audit's finding: flow_grpo's KL is Δt_i times ⟨Δμ²⟩/(2σ̃²Δt); ``kl_form="gaussian"`` is 1/Δt
    times larger (train_sd3.py:895; only the log-prob carries √Δt, sd3_sde_with_logprob.py:59-65)."""
    m, ctx, batch, _ = flow_case
    ctx.hp.update(clip_range=10.0)  # clip out of play, so the two losses differ by their KL terms only
    with torch.no_grad():
        l_fg = m.original_loss(batch, ctx).item()
        ctx.hp["kl_form"] = "gaussian"
        l_g = m.original_loss(batch, ctx).item()
        ctx.hp.update(kl_form="flow_grpo", beta=0.0)
        l_0 = m.original_loss(batch, ctx).item()
        rows, p = batch.rows, ctx.process
        mu = p.mean(rows.x, ctx.policy(rows.x, rows.step, rows.cond), rows.step)
        mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step)
        kl = p.kl(mu, mu_ref, rows.step)
    ctx.hp.update(clip_range=FLOW["clip"], beta=FLOW["beta"])
    assert rel(l_fg - l_0, FLOW["beta"] * (kl * p.dt[rows.step]).mean()) <= 1e-9
    assert rel(l_g - l_0, FLOW["beta"] * kl.mean()) <= 1e-9


DANCE = {"clip": 0.02, "eps": 0.3, "ddof": 1.0}


def dancegrpo_advantages(rewards, cond, C):
    """XueZeyue/DanceGRPO@15cc71d fastvideo/train_grpo_sd.py:540-547: per prompt group,
    (r − mean)/(r.std() + 1e-8), torch's std: divisor n − 1."""
    r, c = rewards.numpy(), cond.numpy()
    adv = np.empty_like(r)
    for p in np.unique(c):
        g = r[c == p]
        adv[c == p] = (g - g.mean()) / (np_std(g, C["ddof"]) + C["eps"])
    return torch.as_tensor(adv)


def dancegrpo_loss(ctx, batch, adv, C):
    """DanceGRPO@15cc71d train_grpo_sd.py:603-653 on the trained transitions: mean over them of
    max(−A·ρ, −A·clamp(ρ, 1 ± clip)), ρ from the DDIM step (ddim_with_logprob)."""
    rows, sch = batch.rows, harness_ddim()
    eps = ctx.policy(rows.x, rows.step, rows.cond)
    _, _, lp = ddim_step(sch, rows.step, rows.x, eps, rows.x_next)
    return ppo_rows(adv[rows.sample], torch.exp(lp - rows.log_prob), C["clip"]).mean()


@pytest.fixture(scope="module")
def dance_case():
    m, ctx, batch = toy("grpo", "diffusion", {"clip_range": DANCE["clip"], "adv_eps": DANCE["eps"]})
    with torch.no_grad():
        ours = m.original_loss(batch, ctx).item()
    return m, ctx, batch, ours


def test_dancegrpo_advantages_steps_and_loss_conform(dance_case):
    """DanceGRPO@15cc71d train_grpo_sd.py:540-547 (unbiased std + eps), :86/:562-571/:603 (each sample's N
    transitions in a random order, the first int((N − 1)·timestep_fraction) = N − 1 trained), :639-653."""
    m, ctx, batch, ours = dance_case
    adv = dancegrpo_advantages(batch.rewards, batch.cond, DANCE)
    assert rel(batch.extras["advantages"], adv) <= REL
    for b in range(len(batch.rewards)):
        steps = batch.rows.step[batch.rows.sample == b].tolist()
        assert len(steps) == len(set(steps)) == int((8 - 1) * 1.0)
    assert len(set(tuple(sorted(set(range(8)) - set(batch.rows.step[batch.rows.sample == b].tolist())))
                    for b in range(8))) > 1  # the left-out transition differs between samples
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, dancegrpo_loss(ctx, batch, adv, DANCE)) <= REL


@pytest.mark.parametrize("key", ["clip", "eps", "ddof"])
def test_dancegrpo_detects_a_changed_constant(dance_case, key):
    _, ctx, batch, ours = dance_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: dancegrpo_loss(ctx, batch, dancegrpo_advantages(batch.rewards, batch.cond, C),
                                                        C), DANCE, [key])


def test_presets_are_the_published_values():
    """flow_grpo@ac4c86e config/base.py:84 (adv_clip_max 5), :86 (clip_range 1e-4), config/grpo.py:90-92
    geneval_sd3 (timestep_fraction 0.99, beta 0.04, global_std True), flow_grpo/stat_tracking.py:28 (+1e-4);
    DanceGRPO@15cc71d fastvideo/config_sd/base.py:85-90 (adv_clip_max 5, clip_range 1e-4, timestep_fraction
    1.0), fastvideo/train_grpo_sd.py:545 (+1e-8)."""
    from rsmbench.core.method import get
    m = get("grpo")
    assert_pinned(m.hparams("flow_grpo"), {"clip_range": 1e-4, "beta": 0.04, "adv_clip_max": 5.0, "adv_eps": 1e-4,
                                           "timestep_fraction": 0.99, "global_std": True, "kl_form": "flow_grpo",
                                           "timestep_rule": "first", "drop_zero_adv": True})
    assert_pinned(m.hparams("dancegrpo"), {"clip_range": 1e-4, "beta": 0.0, "adv_clip_max": 5.0, "adv_eps": 1e-8,
                                           "timestep_fraction": 1.0, "adv_std": "unbiased",
                                           "timestep_rule": "shuffled"})

"""grpo_guard's original against the RSM repository's GRPO-Guard (jaylee2000/rsm@e8be3df
sd35_zeroth_order/flow_grpo/sd3_train_shared.py, reweight ``grpo_guard``; GRPO-Guard's own code was not
found). Tolerance 1e-10 relative (tests/conformance/zo_common.py)."""
import numpy as np
import pytest
import torch

from rsmbench.core.method import get
from tests.conformance.zo_common import (
    REL,
    assert_pinned,
    assert_sensitive,
    flow_grpo_sde,
    flow_sigmas,
    np_std,
    ppo_rows,
    rel,
    toy,
)

C0 = {"clip": 0.02, "eps": 0.3, "a": 0.7, "two": 2.0}  # test values (published ones pinned below)


def guard_loss(ctx, batch, C):
    """sd3_train_shared.py@e8be3df:94-109: ρ̂ = exp((log p − log p_old + ⟨(μ − μ_old)²⟩/(2·s²))·s),
    s = √Δt·σ̃ (train_sd3.py passes grpo_guard_scale = sqrt_dt·tilde_sigma for both scales); the standard
    clip, then ÷ Δt (:147-148); global-std advantages, the first int(0.99·N) steps (default sampler)."""
    ro, N = batch.rollout, ctx.process.num_steps
    sig = flow_sigmas(N)
    r, c = batch.rewards.numpy(), batch.cond.numpy()
    adv = np.empty_like(r)
    for p in np.unique(c):
        adv[c == p] = (r[c == p] - r[c == p].mean()) / (np_std(r) + C["eps"])
    A = torch.clamp(torch.as_tensor(adv), -5.0, 5.0)
    out = []
    for j in range(int(N * 0.99)):
        x, x1 = ro.states[:, j], ro.states[:, j + 1]
        mu, std, lp = flow_grpo_sde(sig, j, x, ctx.policy(x, j, batch.cond), x1, C["a"])
        mu_old, _, _ = flow_grpo_sde(sig, j, x, ro.outputs[:, j], x1, C["a"])
        dt = sig[j] - sig[j + 1]
        s = torch.sqrt(dt) * std.reshape(-1)
        bias = ((mu - mu_old) ** 2).mean(dim=1) / (C["two"] * s**2)
        ratio = torch.exp((lp - ro.log_probs[:, j] + bias) * s)
        out.append(ppo_rows(A, ratio, C["clip"]) / torch.sqrt(dt) ** 2)
    return torch.stack(out).mean()


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = toy("grpo_guard", "flow", {"clip_range": C0["clip"], "adv_eps": C0["eps"]}, shift=0.3)
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


def test_loss_conforms(case):
    ctx, batch, ours = case
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, guard_loss(ctx, batch, C0)) <= REL


@pytest.mark.parametrize("key", list(C0))
def test_detects_a_changed_constant(case, key):
    ctx, batch, ours = case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: guard_loss(ctx, batch, C), C0, [key])


def test_preset_is_the_rsm_default_sampler():
    """config/base.py@e8be3df:96-98 (adv_clip_max 5, clip_range 1e-4); config/sd3_matrix.py:158-159
    (timestep_fraction 0.99, global_std True); flow_grpo/stat_tracking.py (+1e-4)."""
    assert_pinned(get("grpo_guard").hparams("flow_grpo_guard"), {"clip_range": 1e-4, "adv_clip_max": 5.0,
                                                                 "adv_eps": 1e-4, "global_std": True,
                                                                 "timestep_fraction": 0.99, "drop_zero_adv": True})

"""pcpo_reweight's original against the RSM repository (jaylee2000/rsm@e8be3df): diffusion
sd15_zeroth_order/train_grpo.py (uw-sigma matching), flow sd35_zeroth_order/flow_grpo/sd3_train_shared.py
(ppo path, reweight pcpo). Tolerance 1e-10 relative (tests/conformance/zo_common.py)."""
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

# the published constants where they are large enough to be checked in the value; test values otherwise
DIFF = {"const_weight": 4.5, "weight_scale_factor": 8.70575076181, "clip": 0.05, "eps": 0.3}
FLOW = {"zeta": 4.3152134639895925, "clip": 0.02, "eps": 0.3, "a": 0.7}


def diffusion_loss(ctx, batch, C):
    """train_grpo.py@e8be3df:866-871 (A per prompt, population std + eps), :784-791 (transitions 0..N−2),
    :1093-1114 with ``const_weight`` 4.5 and ``weight_scale_factor`` 8.70575076181 (hpsv2_1_lora_grpo.yaml):
    term = ½⟨(4.5·Δε/s)²⟩ + ⟨4.5·Δε·ξ/s⟩, loss = mean max(0, ε|A| + A·term)."""
    ro, N = batch.rollout, ctx.process.num_steps
    r, c = batch.rewards.numpy(), batch.cond.numpy()
    adv = np.empty_like(r)
    for p in np.unique(c):
        g = r[c == p]
        adv[c == p] = (g - g.mean()) / (np_std(g) + C["eps"])
    A = torch.clamp(torch.as_tensor(adv), -5.0, 5.0)
    out = []
    for j in range(N - 1):
        d = ctx.policy(ro.states[:, j], j, batch.cond) - ro.outputs[:, j]
        w, s = C["const_weight"], C["weight_scale_factor"]
        term = 0.5 * ((w * d / s) ** 2).mean(dim=1) + ((w * d) * ro.noises[:, j] / s).mean(dim=1)
        out.append(torch.clamp(C["clip"] * A.abs() + A * term, min=0))
    return torch.stack(out).mean()


def flow_loss(ctx, batch, C):
    """sd3_train_shared.py@e8be3df:52-62 (w^b = √Δt/σ̃·(1 + (1 − t)/(2t)·σ̃²)), :65-66 (ζΔt), :88-92
    (ρ̃ = exp((log p − log p_old)·ζΔt/w^b)), the standard clip (scripts/train_sd3.py:1007-1013); the
    default sampler's global-std advantages (flow_grpo/stat_tracking.py), the first int(0.99·N) steps."""
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
        _, std, lp = flow_grpo_sde(sig, j, x, ctx.policy(x, j, batch.cond), x1, C["a"])
        t, dt, st = sig[j], sig[j] - sig[j + 1], std.reshape(-1)
        w_base = torch.sqrt(dt) / st * (1 + (1 - t) / (2 * t) * st**2)
        ratio = torch.exp((lp - ro.log_probs[:, j]) * C["zeta"] * dt / w_base)
        out.append(ppo_rows(A, ratio, C["clip"]))
    return torch.stack(out).mean()


@pytest.fixture(scope="module")
def diff_case():
    m, ctx, batch = toy("pcpo_reweight", "diffusion", {"clip_range": DIFF["clip"], "adv_eps": DIFF["eps"]})
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


@pytest.fixture(scope="module")
def flow_case():
    m, ctx, batch = toy("pcpo_reweight", "flow", {"clip_range": FLOW["clip"], "adv_eps": FLOW["eps"]})
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


def test_diffusion_matching_conforms(diff_case):
    ctx, batch, ours = diff_case
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, diffusion_loss(ctx, batch, DIFF)) <= REL


def test_flow_ratio_form_conforms(flow_case):
    """The default flow form is the RSM code's ppo path ("ratio"), not PCPO's 1 + log ρ (form "logrho")."""
    ctx, batch, ours = flow_case
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, flow_loss(ctx, batch, FLOW)) <= REL


@pytest.mark.parametrize("key", list(DIFF))
def test_diffusion_detects_a_changed_constant(diff_case, key):
    ctx, batch, ours = diff_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: diffusion_loss(ctx, batch, C), DIFF, [key])


@pytest.mark.parametrize("key", list(FLOW))
def test_flow_detects_a_changed_constant(flow_case, key):
    ctx, batch, ours = flow_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: flow_loss(ctx, batch, C), FLOW, [key])


def test_presets_are_the_published_values():
    """hpsv2_1_lora_grpo.yaml@e8be3df (const_weight 4.5, weight_scale_factor 8.70575076181, train_clip_range
    1e-4, train_adv_clip_max 5.0), train_grpo.py:870 (+1e-8); sd3_train_shared.py:7 (ζ), config/base.py:96-98,
    config/sd3_matrix.py:158-159."""
    m = get("pcpo_reweight")
    assert_pinned(m.hparams("sd15"), {"const_weight": 4.5, "weight_scale_factor": 8.70575076181, "clip_range": 1e-4,
                                      "adv_clip_max": 5.0, "adv_eps": 1e-8, "form": "matching"})
    assert_pinned(m.hparams("sd35"), {"zeta": 4.3152134639895925, "clip_range": 1e-4, "adv_clip_max": 5.0,
                                      "adv_eps": 1e-4, "global_std": True, "timestep_fraction": 0.99, "form": "ratio"})

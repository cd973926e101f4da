"""pcpo's original against the RSM repository's PCPO-base (jaylee2000/rsm@e8be3df
sd15_zeroth_order/train_grpo.py, the matching loss at ``const_weight: null``) on the SD1.5 50-step grid.
Tolerance 1e-10 relative (tests/conformance/zo_common.py)."""
import numpy as np
import pytest
import torch

from rsmbench.core.method import get
from rsmbench.harness import equivalence, influence
from tests.conformance.zo_common import REL, assert_pinned, assert_sensitive, ddim_scheduler, move, np_std, rel

C0 = {"clip": 0.05, "eps": 0.3, "adv_clip": 1.0, "half": 0.5}  # test values (published ones pinned below)


def rsm_inference_weights(sch, t, num_steps):
    """train_grpo.py@e8be3df:65-92 ``compute_inference_weights``: w(t) = (c1(t) − c2(t))/σ_t with
    σ_t² = (1 − ᾱ')(1 − ᾱ/ᾱ')/(1 − ᾱ), c2 = √(1 − ᾱ' − σ_t²), c1 = √(1 − ᾱ)/√(ᾱ/ᾱ'), t' = t − 1000//num_steps
    clamped at 0; num_steps is the width of the stored timesteps, N − 1 (= 49: 1000//49 = 1000//50 = 20)."""
    acp = sch.alphas_cumprod.double()
    a = acp[t]
    ap = acp[(t - 1000 // num_steps).clamp(min=0)]
    s2 = (1 - ap) * (1 - a / ap) / (1 - a)
    return (torch.sqrt(1 - a) / torch.sqrt(a / ap) - torch.sqrt(1 - ap - s2)) / torch.sqrt(s2)


def pcpo_base_loss(ctx, batch, C):
    """train_grpo.py@e8be3df: A per prompt group (r − mean)/(std(unbiased=False) + 1e-8) (:866-871), clamped
    to ±adv_clip (:1059-1063); transitions 0..N−2 (:784-791 stores timesteps[:, :-1]); ``noise_matching_precision:
    bad`` term = ½⟨(w·Δε/s)²⟩ + ⟨(w·Δε)·ξ/s⟩, s = weight_scale_factor 1 (:1093-1102); loss = mean
    max(0, ε|A| + A·term) (:1109-1114)."""
    ro, N = batch.rollout, ctx.process.num_steps
    r, c = batch.rewards.numpy(), batch.cond.numpy()
    adv = np.empty_like(r)
    for p in np.unique(c):
        g = r[c == p]
        adv[c == p] = (g - g.mean()) / (np_std(g) + C["eps"])
    A = torch.clamp(torch.as_tensor(adv), -C["adv_clip"], C["adv_clip"])
    sch = ddim_scheduler(N, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    total = []
    for j in range(N - 1):
        x = ro.states[:, j]
        w = rsm_inference_weights(sch, sch.timesteps[j].long(), N - 1)
        d = ctx.policy(x, j, batch.cond) - ro.outputs[:, j]
        term = (C["half"] * (w * d) ** 2).mean(dim=1) + (w * d * ro.noises[:, j]).mean(dim=1)
        total.append(torch.clamp(C["clip"] * A.abs() + A * term, min=0))
    return torch.stack(total).mean()


@pytest.fixture(scope="module")
def case():
    m = get("pcpo")
    hp = m.hparams("pcpo_base", clip_range=C0["clip"], adv_eps=C0["eps"], adv_clip_max=C0["adv_clip"])
    ctx = influence.real_context(m, "diffusion", hp)  # the SD1.5 grid: 50 DDPM steps, scaled-linear betas
    ctx.hp = hp
    batch = equivalence.collect(m, ctx)
    move(ctx, 0.05)
    with torch.no_grad():
        return ctx, batch, get("pcpo").original_loss(batch, ctx).item()


def test_matching_loss_conforms(case):
    ctx, batch, ours = case
    assert sorted(set(batch.rows.step.tolist())) == list(range(49))
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, pcpo_base_loss(ctx, batch, C0)) <= REL


@pytest.mark.parametrize("key", list(C0))
def test_detects_a_changed_constant(case, key):
    ctx, batch, ours = case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: pcpo_base_loss(ctx, batch, C), C0, [key])


def test_presets_are_the_published_values():
    """train_grpo.py@e8be3df:870 (+1e-8); configs/train/hpsv2_1_lora_grpo.yaml (train_clip_range 1e-4,
    train_adv_clip_max 5.0); SD3.5 default sampler: config/sd3_matrix.py:158-159 (timestep_fraction 0.99,
    global_std True), config/base.py:96-98, flow_grpo/stat_tracking.py (+1e-4)."""
    m = get("pcpo")
    assert_pinned(m.hparams("pcpo_base"), {"clip_range": 1e-4, "adv_clip_max": 5.0, "adv_eps": 1e-8, "form": "matching",
                                           "timestep_rule": "shuffled_drop_last", "timestep_fraction": 1.0})
    assert_pinned(m.hparams("sd35_base"), {"clip_range": 1e-4, "adv_clip_max": 5.0, "adv_eps": 1e-4, "global_std": True,
                                           "timestep_fraction": 0.99, "timestep_rule": "first", "drop_zero_adv": True})

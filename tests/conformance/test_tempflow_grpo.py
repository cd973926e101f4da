"""tempflow_grpo's original against the RSM repository's TempFlow-GRPO (jaylee2000/rsm@e8be3df
sd35_zeroth_order/scripts/train_sd3_pr.py, reweight ``tempflow_reweight``; TempFlow-GRPO's own code is
unreleased). Tolerance 1e-10 relative (tests/conformance/zo_common.py)."""
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

C0 = {"scale": 2.25, "clip": 0.02, "beta": 0.5, "eps": 0.3, "a": 0.7, "two": 2.0}  # 2.25 published, others test
K = [3, 2, 3, 2]  # uneven: the k_avg/k row weights are in play


def tempflow_loss(ctx, batch, C):
    """train_sd3_pr.py@e8be3df:1621-1696 (``--loss ppo``): per branch row, A standardised among the
    branches of one root and branch step (group_strategy seed; population std + 1e-4), clamped ±5;
    kw = k_avg/k (:1640-1645, :154-161); policy = max(−A·ρ, −A·clamp(ρ, 1 ± clip))·2.25·σ̃·√Δt
    (sd3_train_shared.py:153-154); KL = ⟨Δμ²⟩/(2σ̃²) (``heuristic_kldenom_trick``, :1682-1683); loss =
    Σ kw·policy/#rows + β·Σ kw·KL/#rows (:1678-1690)."""
    tree, leaves, rows = batch.extras["tree"], batch.extras["leaves"], batch.rows
    sig = flow_sigmas(ctx.process.num_steps)
    r = batch.rewards.numpy()
    key = np.stack([tree.root[leaves].numpy(), tree.start[leaves].numpy()], 1)
    adv = np.zeros(tree.num_nodes)
    for g in np.unique(key, axis=0):
        m = (key == g).all(1)
        adv[leaves.numpy()[m]] = (r[m] - r[m].mean()) / (np_std(r[m]) + C["eps"])
    A = torch.clamp(torch.as_tensor(adv)[rows.sample], -5.0, 5.0)
    k = torch.tensor(K, dtype=torch.float64)
    kw = k.mean() / k[rows.step]
    mu, std, lp = flow_grpo_sde(sig, rows.step, rows.x, ctx.policy(rows.x, rows.step, rows.cond), rows.x_next, C["a"])
    mu_ref, _, _ = flow_grpo_sde(sig, rows.step, rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.x_next, C["a"])
    st, dt = std.reshape(-1), sig[rows.step] - sig[rows.step + 1]
    policy = ppo_rows(A, torch.exp(lp - rows.log_prob), C["clip"]) * C["scale"] * st * torch.sqrt(dt)
    kl = ((mu - mu_ref) ** 2).mean(dim=1) / (C["two"] * st**2)
    return (kw * policy).mean() + C["beta"] * (kw * kl).mean()


@pytest.fixture(scope="module")
def case():
    hp = {"k": K, "clip_range": C0["clip"], "beta": C0["beta"], "adv_eps": C0["eps"], "heuristic_kldenom": True}
    m, ctx, batch = toy("tempflow_grpo", "flow", hp)
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


def test_loss_conforms(case):
    ctx, batch, ours = case
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, tempflow_loss(ctx, batch, C0)) <= REL


@pytest.mark.parametrize("key", list(C0))
def test_detects_a_changed_constant(case, key):
    ctx, batch, ours = case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: tempflow_loss(ctx, batch, C), C0, [key])


def test_presets_are_the_rsm_configs():
    """config/sd3_reward_presets.py@e8be3df:10 (beta 0.01), :32 and :165 (geneval: beta 0.004, heuristic off),
    config/sd3_matrix.py:57 (base profile k = 6), :132 (heuristic_kldenom_trick True), config/base.py:98."""
    m = get("tempflow_grpo")
    assert_pinned(m.hparams("rsm_base"), {"beta": 0.01, "heuristic_kldenom": True, "noise_scale": 2.25,
                                          "clip_range": 1e-4, "adv_clip_max": 5.0, "k": [6] * 9})
    assert_pinned(m.hparams("rsm_base_geneval"), {"beta": 0.004, "heuristic_kldenom": False, "noise_scale": 2.25})

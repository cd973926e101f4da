"""reinforce_kl's original against its Table-1 formula (REINFORCE + per-step KL; DPOK, Fan et al. 2023,
arXiv 2305.16381, Eq. 8 and Eq. 10, no code of its own: DPOK's code is tests/conformance/test_dpok.py's)
with DPOK's published coefficients. Tolerance 1e-10 relative (tests/conformance/zo_common.py)."""
import numpy as np
import pytest
import torch

from rsmbench.core.method import get
from tests.conformance.zo_common import REL, assert_pinned, assert_sensitive, ddim_step, harness_ddim, rel, toy

C0 = {"alpha": 10.0, "beta": 1000.0, "two": 2.0}  # test β: the toy rewards are O(1e3)


def reinforce_kl_loss(ctx, batch, C):
    """Per transition −α·A·⟨log p_θ(x'|x)⟩ + β·⟨(μ_θ − μ_ref)²⟩/(2σ²) (the Gaussian KL of Eq. 10,
    per-element mean as in DPOK's scheduling_ddim_extended.py@10270a5 log-prob), A = r − mean_prompt r;
    the DDIM step of kvablack/ddpo-pytorch ddim_with_logprob.py@1958463; mean over transitions."""
    rows, sch = batch.rows, harness_ddim()
    r, c = batch.rewards.numpy(), batch.cond.numpy()
    adv = np.empty_like(r)
    for p in np.unique(c):
        adv[c == p] = r[c == p] - r[c == p].mean()
    A = torch.as_tensor(adv)[rows.sample]
    mu, std, lp = ddim_step(sch, rows.step, rows.x, ctx.policy(rows.x, rows.step, rows.cond), rows.x_next)
    mu_ref, _, _ = ddim_step(sch, rows.step, rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.x_next)
    kl = ((mu - mu_ref) ** 2).mean(dim=1) / (C["two"] * std.reshape(-1) ** 2)
    return (-C["alpha"] * A * lp + C["beta"] * kl).mean()


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = toy("reinforce_kl", "diffusion", {"reward_weight": C0["alpha"], "beta": C0["beta"]})
    with torch.no_grad():
        return ctx, batch, m.original_loss(batch, ctx).item()


def test_loss_conforms(case):
    ctx, batch, ours = case
    with torch.no_grad():
        assert rel(ours, reinforce_kl_loss(ctx, batch, C0)) <= REL


@pytest.mark.parametrize("key", list(C0))
def test_detects_a_changed_constant(case, key):
    ctx, batch, ours = case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: reinforce_kl_loss(ctx, batch, C), C0, [key])


def test_preset_is_dpoks_command():
    """google-research dpok/README.md@83282e4: ``--reward_weight 10 --kl_weight 0.01``."""
    assert_pinned(get("reinforce_kl").hparams("dpok"), {"reward_weight": 10.0, "beta": 0.01})

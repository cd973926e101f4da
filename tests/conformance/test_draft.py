"""DRaFT has no official code; the best available source is the SQDF authors' DRaFT baselines
(Shin-woocheol/SQDF@68861b2 T2I: 'fixed' truncation = DRaFT-K, 'draftlv' = DRaFT-LV's reduction),
checked here for DRaFT-1 (their aesthetic.sh 'draft' run: ``--backward_step=49`` of 50 steps, i.e.
K = 1, at the default ``sample_eta`` 1.0) and for the LV reduction. Their LV denoises the re-noised
x̃_1 with the detached last-step noise prediction (sd_pipeline.py:1629-1660); the suite follows the
paper's description (a fresh differentiable step of each x̃_1), so only its noising and reduction are
compared with theirs. Relative tolerance 1e-10, float64.
"""
import pytest
import torch

from rsmbench.core.diffrollout import forward_noise
from tests.conformance._first_order import TOL, ddim_mean, ddim_std, perturbed, rel, setup, value_and_grad

CONSTS = {"eta": 1.0, "loss_sign": -1.0}
LV_CONSTS = {"eta": 1.0, "loss_sign": -1.0, "draws": 2.0}


def authors_draft_loss(ctx, batch, eta, loss_sign):
    """SQDF@68861b2 T2I/sd_pipeline.py:1437-1445 (backprop_timestep = ``value`` for 'fixed': N − 1 here),
    :1523-1548 (noise prediction detached for i < backprop_timestep), :1612-1614 (``scheduler_step``
    :303-424: DDIM-η mean + σ·noise, the stored noises here); T2I/alignprop_trainer.py:160-183 with
    aesthetic_target None (loss = −1·r), :558-559 (loss.mean())."""
    sch, ro = ctx.process.scheduler, batch.rollout
    N = ctx.process.num_steps
    x = ro.states[:, 0]
    for i in range(N):
        eps = ctx.policy(x, i, batch.cond)
        if i < N - 1:
            eps = eps.detach()
        t = sch.timesteps[i].long().expand(len(x))
        x = ddim_mean(sch, x, eps, t, eta) + ddim_std(sch, t, eta).reshape(-1, 1) * ro.noises[:, i]
    return (loss_sign * ctx.reward(x, batch.cond)).mean()


def authors_lv_loss(ctx, batch, eta, loss_sign, draws):
    """The reduction of SQDF@68861b2 T2I/alignprop_trainer.py:555-557 (``loss.view(bs, draftlv_loop)
    .sum(dim=1).mean()``) over the n one-step denoisings of the stored x̃_1 (a fresh differentiable DDIM-η
    step each, the paper's DRaFT-LV; see the module docstring)."""
    sch, lv = ctx.process.scheduler, batch.extras["lv"]
    i = ctx.process.num_steps - 1
    x1 = lv.states[:, 0]
    t = sch.timesteps[i].long().expand(len(x1))
    x = ddim_mean(sch, x1, ctx.policy(x1, i, lv.cond), t, eta) + ddim_std(sch, t, eta).reshape(-1, 1) * lv.noises[:, 0]
    per_draw = loss_sign * ctx.reward(x, lv.cond)
    return per_draw.sum() * draws / len(per_draw)  # Σ_{b,j} / B with B = (n·B rows) / n


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup("draft", "diffusion", {"preset": "draft_1"})
    return ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


@pytest.fixture(scope="module")
def lv_case():
    m, ctx, batch = setup("draft", "diffusion", {"preset": "draft_lv", "lv_reduce": "sum"})
    return ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


def test_draft_1_loss_is_the_sqdf_baseline(case):
    ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_draft_loss(ctx, batch, **CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL


@pytest.mark.parametrize("name", list(CONSTS))
def test_draft_1_check_fails_under_perturbation(case, name):
    ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_draft_loss(ctx, batch, **perturbed(CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def test_draft_lv_sum_is_the_sqdf_reduction(lv_case):
    ctx, batch, (lo, go) = lv_case
    lt, gt = value_and_grad(authors_lv_loss(ctx, batch, **LV_CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL


@pytest.mark.parametrize("name", list(LV_CONSTS))
def test_draft_lv_check_fails_under_perturbation(lv_case, name):
    ctx, batch, (lo, go) = lv_case
    lt, gt = value_and_grad(authors_lv_loss(ctx, batch, **perturbed(LV_CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def test_lv_renoising_is_sqdfs_one_step_noising():
    """SQDF@68861b2 T2I/sd_pipeline.py:274-300 (``one_step_noising``): x̃_1 = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε at
    t = timesteps[N − 1] (the last sampling step's timestep, :1658)."""
    _, ctx, _ = setup("draft", "diffusion")
    p = ctx.process
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    ab = p.scheduler.alphas_cumprod.double()[p.scheduler.timesteps[-1].long()]
    assert rel(forward_noise(p, x0, p.num_steps - 1, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps) <= TOL

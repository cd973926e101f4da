"""AlignProp against its authors' code, both versions: the per-step truncation of the version the
presets cite (mihirp1998/AlignProp@a831a5f main.py) and the one-draw truncation of HEAD
(mihirp1998/AlignProp@b22918a sd_pipeline.py). Loss and θ-gradient: relative tolerance 1e-10, float64;
the truncation laws: frequencies over 40000 draws within 0.012 (≥ 5 standard errors).
"""
import math

import pytest
import torch

from tests.conformance._first_order import TOL, ddim_mean, perturbed, rel, setup, value_and_grad

HP = {"preset": "aesthetic", "k_max": 8}  # the cited config's (0, 50) range, scaled to the toy's 8 steps
CONSTS = {"loss_coeff": 0.01, "aesthetic_target": 10.0}


def authors_loss(ctx, batch, loss_coeff, aesthetic_target):
    """mihirp1998/AlignProp@a831a5f main.py:470-507: from the initial latent, for every step i the CFG
    noise prediction is detached when i < ``timestep`` (the draw of that step, :483-488, the batch's
    ``trained`` mask here), then ``pipeline.scheduler.step(noise_pred, t, latent)``: DDIMScheduler at its
    default η = 0 (:227-228, :496); loss = Σ_b |r − aesthetic_target| / B · loss_coeff
    (``aesthetic_loss_fn`` :89-112, :505-507)."""
    sch, ro, trained = ctx.process.scheduler, batch.rollout, batch.extras["trained"]
    x = ro.states[:, 0]
    for i in range(ctx.process.num_steps):
        eps = ctx.policy(x, i, batch.cond)
        if not trained[i]:
            eps = eps.detach()
        x = ddim_mean(sch, x, eps, sch.timesteps[i].long().expand(len(x)), 0.0)
    r = ctx.reward(x, batch.cond)
    return (r - aesthetic_target).abs().sum() / len(r) * loss_coeff


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup("alignprop", "diffusion", HP)
    trained = batch.extras["trained"]
    first = int(torch.nonzero(trained)[0])
    assert not trained[first:].all(), "the fixed draw must leave a detached step after a trained one"
    return ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


def test_alignprop_per_step_loss_is_the_authors(case):
    ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch, **CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL


@pytest.mark.parametrize("name", list(CONSTS))
def test_alignprop_check_fails_under_perturbation(case, name):
    ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch, **perturbed(CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def _masks(hp, n=40_000):
    from rsmbench.core.method import get
    m = get("alignprop")

    class Ctx:  # trained_steps reads only the hyperparameters and the grid size
        process = type("P", (), {"num_steps": 50})()

    Ctx.hp = m.hparams(**hp)
    return torch.stack([m.trained_steps(Ctx, [s]) for s in range(n)]).double()


def test_per_step_truncation_law():
    """main.py@a831a5f:485-486: ``random.randint(0, 50)`` (both ends included) per step, detach when
    i < draw, so step i of 50 is trained with probability (i + 1)/51."""
    freq = _masks({"preset": "aesthetic"}).mean(dim=0)
    law = (torch.arange(50, dtype=torch.float64) + 1) / 51
    assert (freq - law).abs().max() <= 0.012


def test_head_gaussian_truncation_law():
    """sd_pipeline.py@b22918a:124-131: b = int(Normal(42, 5).sample()) redrawn until 1 ≤ b ≤ 49, the steps
    i ≥ b trained (:224-225), i.e. K = 50 − b contiguous last steps."""
    g = torch.Generator().manual_seed(12345)
    law = torch.zeros(51, dtype=torch.float64)
    n = 0
    while n < 40_000:
        b = int(torch.normal(42.0, 5.0, (1,), generator=g).item())
        if 1 <= b <= 49:
            law[50 - b] += 1
            n += 1
    masks = _masks({"preset": "aesthetic_head"})
    K = masks.sum(dim=1).long()
    assert all(bool(masks[j, 50 - int(K[j]):].all()) for j in range(0, 40_000, 997))  # contiguous last K
    freq = torch.bincount(K, minlength=51).double() / 40_000
    assert (freq - law / 40_000).abs().max() <= 0.012
    mean_law = (torch.arange(51, dtype=torch.float64) * law).sum().item() / 40_000  # ≈ 9.1 (b ≥ 50 redrawn)
    assert math.isclose(K.double().mean().item(), mean_law, abs_tol=0.1)

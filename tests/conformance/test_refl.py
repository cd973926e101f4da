"""ReFL against the authors' code (THUDM/ImageReward@c1392c6 ImageReward/ReFL.py, scripts/train_refl.sh):
40 DDPM steps, one late step j with grad, x̂_0 = ``pred_original_sample``, loss ReLU(2 − r)·grad_scale.
Relative tolerance 1e-10, float64, on a 40-step grid with the harness's tiny networks, no CFG (ReFL's
UNet call has none).
"""
import pytest
import torch

from rsmbench.harness.equivalence import PROCESS_KW
from tests.conformance._first_order import TOL, col, ddim_alphas, perturbed, rel, setup_on_grid, value_and_grad

GRID = dict(PROCESS_KW["diffusion"], num_steps=40)
HP = {"preset": "imagereward"}
CONSTS = {"margin": 2.0, "grad_scale": 1e-3}


def bounded_reward(x, cond=None):
    """A reward in [−3, 3], so that ReLU(2 − r) binds on part of the batch and the margin matters."""
    return 2 * torch.tanh(0.5 * x[:, 0]) + torch.sin(x[:, 1])


def authors_chain(ctx, ro, j):
    """ReFL.py@c1392c6:712-728: from the initial latents, the first j = ``mid_timestep`` steps without
    grad, ``DDPMScheduler.step`` (diffusers: x̂_0 = (x − √(1−ᾱ_t)ε)/√ᾱ_t, mean = √ᾱ_prev·β_t/(1−ᾱ_t)·x̂_0 +
    √α_t·(1−ᾱ_prev)/(1−ᾱ_t)·x, variance (1−ᾱ_prev)/(1−ᾱ_t)·β_t, ``fixed_small``; the stored noises here)."""
    sch = ctx.process.scheduler
    x = ro.states[:, 0]
    with torch.no_grad():
        for i in range(j):
            t = sch.timesteps[i].long().expand(len(x))
            ab, ab_prev = ddim_alphas(sch, t)
            alpha, beta = ab / ab_prev, 1 - ab / ab_prev
            eps = ctx.policy(x, i, ro.cond)
            x0 = (x - col((1 - ab).sqrt(), x) * eps) / col(ab.sqrt(), x)
            mean = col(ab_prev.sqrt() * beta / (1 - ab), x) * x0 + col(alpha.sqrt() * (1 - ab_prev) / (1 - ab), x) * x
            x = mean + col(((1 - ab_prev) / (1 - ab) * beta).sqrt(), x) * ro.noises[:, i]
    return x


def authors_loss(ctx, x, j, cond, margin, grad_scale):
    """ReFL.py@c1392c6:730-756: ε_θ at (x_j, timesteps[j]) with grad, x̂_0 = ``pred_original_sample``,
    loss = F.relu(−r + margin).mean()·grad_scale (margin 2, ``--grad_scale 0.001``, scripts/train_refl.sh)."""
    sch = ctx.process.scheduler
    ab = sch.alphas_cumprod.double()[sch.timesteps[j].long()]
    x0 = (x - (1 - ab).sqrt() * ctx.policy(x, j, cond)) / ab.sqrt()
    return torch.relu(-ctx.reward(x0, cond) + margin).mean() * grad_scale


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup_on_grid("refl", "diffusion", GRID, HP, cfg_scale=1.0, reward=bounded_reward)
    return ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


def test_refl_loss_is_the_authors(case):
    ctx, batch, (lo, go) = case
    j = batch.extras["step"]
    x = authors_chain(ctx, batch.rollout, j)
    assert rel(batch.rows.x, x) <= TOL  # the no-grad DDPM chain to x_j
    lt, gt = value_and_grad(authors_loss(ctx, x, j, batch.cond, **CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL


@pytest.mark.parametrize("name", list(CONSTS))
def test_refl_check_fails_under_perturbation(case, name):
    ctx, batch, (lo, go) = case
    j = batch.extras["step"]
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows.x, j, batch.cond, **perturbed(CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def test_refl_trained_step_is_randint_30_39():
    """ReFL.py@c1392c6:714-717: ``set_timesteps(40)``, ``mid_timestep = random.randint(30, 39)`` (both
    ends included), one per batch: here j = 40 − K, K ~ Uniform{1 … window = 10} (seeded draw)."""
    from rsmbench.core.diffrollout import draw_truncation
    from rsmbench.harness import equivalence as E
    m, ctx, _ = setup_on_grid("refl", "diffusion", GRID, HP, cfg_scale=1.0)
    first_seed = lambda s: s * 10_000  # noqa: E731  the harness's seeds for batch s
    for s in range(3):  # collect draws its step this way
        K = draw_truncation(int(ctx.hp["step_seed"]) + first_seed(s), 1, int(ctx.hp["window"]))
        assert E.collect(m, ctx, seed=s).extras["step"] == 40 - K
    steps = torch.tensor([40 - draw_truncation(s, 1, int(ctx.hp["window"])) for s in range(2000)])
    assert set(steps.tolist()) == set(range(30, 40))
    assert (torch.bincount(steps - 30, minlength=10).double() / 2000 - 0.1).abs().max() <= 0.03

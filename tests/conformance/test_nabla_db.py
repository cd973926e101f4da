"""Residual ∇-DB (pruned) against the RSM repo's port (jaylee2000/rsm@e8be3df sd15_first_order), and
the official trainers' timestep subsampling. Relative tolerance 1e-10, float64, at θ ≠ θ† (the
``loss`` kind: the identity holds for every θ, and the unet_reg term is live only off θ†).
"""
import pytest
import torch

from rsmbench.core import weights
from tests.conformance._first_order import (
    TOL,
    col,
    ddim_mean,
    ddim_std,
    move_theta,
    perturbed,
    rel,
    setup,
    value_and_grad,
)

# scales chosen so that every term weighs on the loss (the toy's transition scores are ~1e3)
HP = {"reward_scale": 100.0, "pretrained_strength": 1.3, "forward_loss_scale": 1e-6, "unet_reg_scale": 50.0,
      "reward_adaptive_mode": "squared"}
CONSTS = {"reward_scale": 100.0, "strength": 1.3, "forward_loss_scale": 1e-6, "unet_reg_scale": 50.0, "eta": 1.0}


def authors_loss(ctx, rows, reward_scale, strength, forward_loss_scale, unet_reg_scale, eta):
    """jaylee2000/rsm@e8be3df sd15_first_order/trainer/simple_resnabladbtrainer.py:478-609: per row,
    S = −(x' − μ(ε))/σ²·k (``ddim_step_with_logprob`` score, utils/diffusers_patch/ddim_step.py:212-249)
    for ε_θ and ε_ref at x; t_next = clamp(t − T/N, 0) (:566-569); score_r = λ·ᾱ_{t_next}·∇_{x'} r(x̂_0),
    x̂_0 = (x' − √(1−ᾱ)·ε_θ(x', t_next))/√ᾱ (``_compute_score_r_next`` :379-417, 'squared' :320-321);
    loss = fls·mean((S_θ − S_ref − score_r)²) + unet_reg·mean((ε_θ − ε_θ†)²) (:530-531, :601-606), the
    mean over rows (``/ (grad_accum · num_train_timesteps)``, :608-609)."""
    sch = ctx.process.scheduler
    x, xn, i, cond = rows.x, rows.x_next, rows.step, rows.cond
    t = sch.timesteps[i].long()
    eps, eps_ref = ctx.policy(x, i, cond), ctx.ref(x, i, cond).detach()
    std2 = col(ddim_std(sch, t, eta) ** 2, x)
    score = lambda e: -(xn - ddim_mean(sch, x, e, t, eta)) / std2 * strength  # noqa: E731
    t_next = (t - sch.config.num_train_timesteps // sch.num_inference_steps).clamp(min=0)
    ab = col(sch.alphas_cumprod.double()[t_next], x)
    with torch.enable_grad():
        z = xn.detach().requires_grad_(True)
        x0 = (z - (1 - ab).sqrt() * ctx.policy(z, i + 1, cond)) / ab.sqrt()
        (g,) = torch.autograd.grad(ctx.reward(x0, cond).sum(), z)
    score_r = reward_scale * g * ab
    forward = ((score(eps) - score(eps_ref) - score_r) ** 2).mean(dim=1)
    unetreg = ((eps - rows.out_behaviour) ** 2).mean(dim=1)
    return (forward_loss_scale * forward + unet_reg_scale * unetreg).mean()


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup("nabla_db", "diffusion", HP)
    move_theta(ctx)
    # the code takes Tweedie with ε_θ(x', 0) on the last step, we take x̂_0 = x' (stated deviation)
    sub = batch.select_rows(torch.nonzero(batch.rows.step < ctx.process.num_steps - 1).flatten())
    return m, ctx, sub, value_and_grad(m.original_loss(sub, ctx), ctx)


def test_nabla_db_loss_is_the_rsm_port(case):
    _, ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows, **CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL


@pytest.mark.parametrize("name", list(CONSTS))
def test_nabla_db_check_fails_under_perturbation(case, name):
    _, ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows, **perturbed(CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def authors_step_weights(N: int, fraction: float) -> torch.Tensor:
    """The expected number of times each step is trained per sample under low-variance subsampling,
    read off jaylee2000/rsm@e8be3df sd15_first_order/trainer/ddptrainer.py:140-145 (⌊N·f⌋ + 1 columns)
    and :933-958 (column 0 is N − 1; then one uniform index per trunk of N/⌊N·f⌋ steps, trunks in
    reversed order), the same at lzzcd001/nabla-gfn@6b74d4c train_nablagfn.py:324, 503-526."""
    n_trunks = int(N * fraction)
    size = N // n_trunks
    w = torch.zeros(N, dtype=torch.float64)
    w[N - 1] += 1.0
    for trunk in reversed(range(n_trunks)):  # the first n_trunks entries of ``trunk_order``
        w[trunk * size:(trunk + 1) * size] += 1.0 / size
    return w


@pytest.mark.parametrize("N,fraction,ratio", [(50, 0.2, 6.0), (50, 0.1, 11.0), (20, 0.25, 5.0)])
def test_low_variance_subsampling_is_the_trainers(N, fraction, ratio):
    w = authors_step_weights(N, fraction)
    assert abs(w[-1] / w[0] - ratio) <= 1e-12  # the final step's weight relative to any other
    steps = weights.train_steps(N, 40_000, fraction, True, torch.Generator().manual_seed(0))
    n = int(N * fraction)
    assert steps.shape == (40_000, n + 1) and (steps[:, 0] == N - 1).all()
    size = N // n
    assert ((steps[:, 1:] // size) == torch.arange(n)).all()  # one draw per trunk
    freq = torch.bincount(steps.reshape(-1), minlength=N).double() / 40_000
    assert ((freq - w).abs() <= 0.012).all(), (freq - w).abs().max()  # ≥ 5 standard errors (≤ 0.0023)


def test_preset_trains_the_official_rows():
    m, ctx, batch = setup("nabla_db", "diffusion", {"preset": "sd15_pruned_baseline"})
    N = ctx.process.num_steps  # the toy grid: 8 steps, ⌊8·0.2⌋ = 1 trunk → the last step + one of 8
    assert len(batch.rows) == 8 * 2 and (batch.rows.step[::2] == N - 1).all()

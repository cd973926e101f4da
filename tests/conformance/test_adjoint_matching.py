"""Adjoint Matching against Microsoft's SD1.5 implementation (microsoft/soc-fine-tuning-sd@489f904,
``configs/multi_prompt.yaml``: eta 1.0, num_timesteps_to_load_train 4, per_sample_threshold_quantile
0.9, no guidance in the adjoint or the control). Relative tolerance 1e-10, float64, at θ = θ† (the
code's on-policy regime, where its clip mask is evaluated). The code sums over elements without the
½; the suite's ½⟨·⟩ is that times 1/(2D) (a stated constant scale), undone below.
"""
import pytest
import torch

from methods.adjoint_matching import EARLY_FRACTION, QuantileEMA
from tests.conformance._first_order import TOL, col, ddim_mean, ddim_std, perturbed, rel, setup, value_and_grad

HP = {"reward_scale": 2.0}
CONSTS = {"reward_multiplier": 2.0, "quantile": 0.9, "eta": 1.0}


def authors_adjoints(ctx, ro, reward_multiplier, eta):
    """am_trainer.py:142-176 (``compute_adjoints``): a = −reward_multiplier·∇r(x_N); for k = N−1 … 0,
    a += ∇_x Σ((μ_init(x_k) − x_k)·a) (``grad_inner_product`` :64-108, the base model's noise-free
    step, SOC_DDIM_scheduler.py:161-253), adjoint_states[:, k] = a (the adjoint at x_k)."""
    sch = ctx.process.scheduler
    with torch.enable_grad():
        xN = ro.final.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(ctx.reward(xN, ro.cond).sum(), xN)
    a = -reward_multiplier * g
    adj = [None] * (ro.steps.numel() + 1)
    adj[-1] = a
    for k in range(ro.steps.numel() - 1, -1, -1):
        t = sch.timesteps[k].long().expand(ro.batch_size)
        with torch.enable_grad():
            x = ro.states[:, k].detach().requires_grad_(True)
            mu = ddim_mean(sch, x, ctx.ref(x, k, ro.cond), t, eta)
            (inner,) = torch.autograd.grad(((mu - x) * a).sum(), x)
        a = a + inner
        adj[k] = a
    return torch.stack(adj, dim=1)


def authors_loss(ctx, batch, reward_multiplier, quantile, eta):
    """am_trainer.py:289-362 (``compute_loss``): control_times_sqrt_dt = (μ_θ − μ_init)/σ
    (soc_trainer.py:407-424), loss_evals = Σ_elements (control·√dt + ã_k·σ)² with ã at the row's own
    state (adjoint_states[:, indices_t] :299), τ = EMA of the ``quantile`` of √loss_evals (a fresh EMA:
    its first value), mask = √loss_evals < τ, loss = mean(loss_evals·mask). Returns (loss, τ)."""
    sch, rows = ctx.process.scheduler, batch.rows
    adj = authors_adjoints(ctx, batch.rollout, reward_multiplier, eta)[rows.sample, rows.step]
    t = sch.timesteps[rows.step].long()
    mu = ddim_mean(sch, rows.x, ctx.policy(rows.x, rows.step, rows.cond), t, eta)
    mu_init = ddim_mean(sch, rows.x, ctx.ref(rows.x, rows.step, rows.cond).detach(), t, eta)
    std = col(ddim_std(sch, t, eta), rows.x)
    loss_evals = ((mu - mu_init) / std + adj * std).pow(2).sum(dim=1)
    root = loss_evals.detach().sqrt()
    tau = QuantileEMA().update(torch.quantile(root, quantile).item())  # first update: the value itself
    mask = (root < tau).double()
    return (loss_evals * mask).mean(), tau


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup("adjoint_matching", "diffusion", HP, cfg_scale=1.0)
    return m, ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


def test_adjoint_matching_loss_is_the_reference_implementation(case):
    m, ctx, batch, (lo, go) = case
    D = batch.rows.x[0].numel()
    loss, tau = authors_loss(ctx, batch, **CONSTS)
    lt, gt = value_and_grad(loss, ctx)
    assert rel(2 * D * lo, lt) <= TOL and rel(2 * D * go, gt) <= TOL
    assert rel(batch.extras["stats"]["am_clip_threshold"], tau) <= TOL
    keep = batch.row_data["keep"]
    assert 0 < keep.sum() < len(keep)  # the clip binds on part of the rows


@pytest.mark.parametrize("name", list(CONSTS))
def test_adjoint_matching_check_fails_under_perturbation(case, name):
    m, ctx, batch, (lo, go) = case
    D = batch.rows.x[0].numel()
    loss, tau = authors_loss(ctx, batch, **perturbed(CONSTS, name))
    lt, gt = value_and_grad(loss, ctx)
    errs = (rel(2 * D * lo, lt), rel(2 * D * go, gt), rel(batch.extras["stats"]["am_clip_threshold"], tau))
    assert max(errs) > TOL


def test_next_state_adjoint_is_not_the_reference_pairing():
    """``adjoint_time: next`` (ã_{k+1}, the suite's former pairing) is an O(Δt) shift from the code."""
    m, ctx, batch = setup("adjoint_matching", "diffusion", {**HP, "adjoint_time": "next", "clip_quantile": -1},
                          cfg_scale=1.0)
    D = batch.rows.x[0].numel()
    lo, go = value_and_grad(m.original_loss(batch, ctx), ctx)
    _, gt = value_and_grad(authors_loss(ctx, batch, **{**CONSTS, "quantile": 1.0})[0], ctx)
    assert rel(2 * D * go, gt) > 1e-3


def authors_ema(values, decay):
    """am_trainer.py:178-187 (``EMA_update``), as written there."""
    ema, n = -1, 0
    for v in values:
        if n == 0:
            ema = v
        elif n < 1 / decay:
            ema = v / (n + 1) + (1 - 1 / (n + 1)) * ema
        else:
            ema = decay * ema + (1 - decay) * v
        n += 1
    return ema


@pytest.mark.parametrize("decay", [0.9, 0.9 * (1 + 1e-6)])
def test_threshold_ema_is_the_codes(decay):
    values = [3.0, 1.5, 2.25, 4.0, 0.5, 2.0]
    ema = QuantileEMA(0.9)
    for v in values:
        ours = ema.update(v)
    err = abs(ours - authors_ema(values, decay)) / abs(authors_ema(values, decay))
    assert err <= TOL if decay == 0.9 else err > TOL


def test_stratified_steps_are_the_codes():
    """am_trainer.py:204-224: ⌊n/2⌋ distinct steps of the first round(0.6·N), n − ⌊n/2⌋ distinct of the
    rest, sorted; n = 4 (``num_timesteps_to_load_train``)."""
    assert EARLY_FRACTION == 0.6
    m, ctx, batch = setup("adjoint_matching", "diffusion")
    mid = round(ctx.process.num_steps * 0.6)
    steps = batch.rows.step.reshape(-1, 4)
    assert (steps[:, :2] < mid).all() and (steps[:, 2:] >= mid).all() and (steps.diff(dim=1) > 0).all()
    assert len({tuple(s) for s in steps.tolist()}) > 1  # one draw per trajectory

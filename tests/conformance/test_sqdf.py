"""SQDF's loss against the authors' code (Shin-woocheol/SQDF@68861b2, T2I, no-consistency-model path).

Relative tolerance 1e-10 (tests/conformance/_first_order.py), float64.
"""
import pytest
import torch

from rsmbench.core.rsm import rsm_loss
from tests.conformance._first_order import (
    TOL,
    ddim_mean,
    ddim_std,
    mixed_sign_reward,
    perturbed,
    rel,
    setup,
    value_and_grad,
)

HP = {"alpha": 0.3, "gamma_d": 0.9, "lookahead_steps": 0, "reward_mask": True}
CONSTS = {"alpha": 0.3, "gamma": 0.9, "kl_factor": 1.0, "eta": 1.0}


def authors_loss(ctx, rows, alpha, gamma, kl_factor, eta):
    """Shin-woocheol/SQDF@68861b2 T2I/sd_pipeline.py:1013-1060 (the state x_t of step i, ε_θ and ε_ref,
    ``sqdf_scheduler_step`` :473-566: DDIM-η means of both, x_{t−1} = μ_θ + σξ,
    KL_loss_term = (1/σ²)·mean((μ_ref − μ_θ)²)), :1064, :1107-1131 (``use_consistency_model=False``:
    x̂_0 = the reference's Tweedie at timesteps[min(i+1, N−1)], x_0 = x_{t−1} when N − i − 1 = 0),
    T2I/alignprop_trainer.py:544-549 (mask = (rewards > 0); loss = mean(mask·−(γ^(N−i−1)·r − α·KL)))."""
    sch, N = ctx.process.scheduler, ctx.process.num_steps
    x, i, cond = rows.x, rows.step, rows.cond
    t = sch.timesteps[i].long()
    eps, eps_ref = ctx.policy(x, i, cond), ctx.ref(x, i, cond).detach()
    mu, mu_ref = ddim_mean(sch, x, eps, t, eta), ddim_mean(sch, x, eps_ref, t, eta)
    std = ddim_std(sch, t, eta).reshape(-1, 1)
    prev = mu + std * rows.noise
    kl = kl_factor * ((mu_ref - mu) ** 2).mean(dim=1) / std.reshape(-1) ** 2
    i_next = (i + 1).clamp(max=N - 1)
    t_next = sch.timesteps[i_next].long()
    ab = sch.alphas_cumprod.double()[t_next].reshape(-1, 1)
    x0_hat = (prev - (1 - ab).sqrt() * ctx.ref(prev, i_next, cond)) / ab.sqrt()
    gamma_exp = N - i - 1
    x0 = torch.where((gamma_exp == 0).reshape(-1, 1), prev, x0_hat)
    r = ctx.reward(x0, cond)
    mask = (r > 0).double()
    return (mask * -(gamma ** gamma_exp.double() * r - alpha * kl)).mean()


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup("sqdf", "diffusion", HP, reward=mixed_sign_reward)
    return m, ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


def test_sqdf_loss_is_the_authors(case):
    m, ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows, **CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL
    # the reward mask binds on part of the batch: both signs occur
    x0 = m._lookahead_x0(ctx, batch.rows.x_next, batch.rows.step + 1, batch.rows.cond)
    r = ctx.reward(x0, batch.rows.cond)
    assert 0 < int((r > 0).sum()) < len(r)
    # and the RSM instance follows the fixed original at θ†
    _, g_rsm = value_and_grad(rsm_loss(ctx.policy, ctx.ref, m.rsm_spec(batch, ctx)), ctx)
    assert rel(g_rsm, go) <= 1e-9


@pytest.mark.parametrize("name", list(CONSTS))
def test_sqdf_check_fails_under_perturbation(case, name):
    _, ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows, **perturbed(CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def test_sqdf_replay_buffer_ring_and_draw():
    """T2I/alignprop_trainer.py@68861b2:867-906 (ring of buffer_size trajectories, oldest overwritten),
    :921-947 (N = as many trajectories as sampled, ``random.sample`` without replacement); the rows
    replayed from older policies still give the exact gradient at θ† (both formulations, 1e-9)."""
    m, ctx, batch = setup("sqdf", "diffusion", {"use_buffer": True, "buffer_size": 12, "alpha": 0.2})
    B = batch.rollout.batch_size  # 8 per collect
    assert m._stored == 8 and m._written == 8
    from rsmbench.harness import equivalence as E
    b2 = E.collect(m, ctx, seed=1)
    assert m._stored == 12 and m._written == 16
    # slots 0-3 were overwritten by the second batch's last 4 trajectories, 4-7 keep the first batch's
    assert torch.equal(m._buf[:4], b2.rollout.states[4:, :-1])
    assert torch.equal(m._buf[4:8], batch.rollout.states[4:, :-1])
    picked = b2.extras["buffer"]["picked"]
    assert len(set(picked.tolist())) == B and int(picked.max()) < 12
    assert torch.equal(b2.rows.x, m._buf[picked.repeat_interleave(ctx.process.num_steps), b2.rows.step])
    state = m.state_dict()
    m2 = type(m)()
    m2.load_state_dict(state)
    assert torch.equal(m2._buf, m._buf) and m2._written == 16 and m2._stored == 12
    go = value_and_grad(m.original_loss(b2, ctx), ctx)[1]
    gr = value_and_grad(rsm_loss(ctx.policy, ctx.ref, m.rsm_spec(b2, ctx)), ctx)[1]
    assert rel(gr, go) <= 1e-9

"""Rollouts: determinism, batch-size independence, stored quantities, on-policy ratio = 1."""
import pytest
import torch

from rsmbench.core.rollout import generators, sample
from tests.helpers import tiny_policy


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_same_seed_gives_bit_identical_trajectories(kind):
    _, beh = tiny_policy(kind, cfg_scale=2.0)
    cond = torch.tensor([0, 1, 1])
    a = sample(beh, (2,), generators([1, 2, 3]), cond=cond, dtype=torch.float64)
    b = sample(beh, (2,), generators([1, 2, 3]), cond=cond, dtype=torch.float64)
    for f in ("states", "noises", "means", "outputs", "log_probs"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    c = sample(beh, (2,), generators([1, 2, 4]), cond=cond, dtype=torch.float64)
    assert not torch.equal(a.final[2], c.final[2]) and torch.equal(a.final[:2], c.final[:2])


@pytest.mark.parametrize("kind,arch", [("diffusion", "mlp"), ("flow", "mlp"), ("diffusion", "unet")])
def test_per_sample_results_do_not_depend_on_batch_size(kind, arch):
    _, beh = tiny_policy(kind, arch=arch, cfg_scale=1.5, num_steps=4)
    shape = (2,) if arch == "mlp" else (3, 8, 8)
    seeds, cond = [11, 12, 13, 14], torch.tensor([0, 1, 0, 1])
    full = sample(beh, shape, generators(seeds), cond=cond, dtype=torch.float64)
    one = sample(beh, shape, generators(seeds[2:3]), cond=cond[2:3], dtype=torch.float64)
    # float64 kernels may reorder sums across batch sizes: agreement to 1e-12, not bitwise
    torch.testing.assert_close(full.states[2:3], one.states, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full.log_probs[2:3], one.log_probs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_stored_quantities_and_on_policy_ratio(kind):
    pol, beh = tiny_policy(kind, cfg_scale=1.5)
    p = pol.process
    cond = torch.tensor([0, 1, 0, 1])
    ro = sample(beh, (2,), generators(range(4)), cond=cond, dtype=torch.float64)
    assert ro.states.shape == (4, p.num_steps + 1, 2) and ro.log_probs.shape == (4, p.num_steps)
    rows = ro.transitions()
    assert len(rows) == 4 * p.num_steps
    torch.testing.assert_close(rows.x_next, rows.mean + p.std(rows.step, like=rows.x) * rows.noise,
                               rtol=1e-12, atol=1e-12)
    out = pol(rows.x, rows.step, rows.cond)  # θ = θ† → ratio exactly 1
    ratio = torch.exp(p.log_prob(rows.x_next, p.mean(rows.x, out, rows.step), rows.step) - rows.log_prob)
    assert torch.equal(ratio, torch.ones_like(ratio))


def test_deterministic_mask_gives_ode_steps_and_nan_logprob():
    _, beh = tiny_policy("flow")
    mask = torch.tensor([True, False, False, True, False, False])
    ro = sample(beh, (2,), generators([0, 1]), stochastic=mask, dtype=torch.float64)
    assert torch.all(ro.noises[:, 1] == 0) and torch.isnan(ro.log_probs[:, 1]).all()
    assert len(ro.transitions()) == 2 * 2
    with pytest.raises(ValueError, match="stochastic mask"):
        sample(beh, (2,), generators([0]), stochastic=[True])

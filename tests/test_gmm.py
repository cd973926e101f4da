"""The gmm ground truth: exact tilts, J*, marginals and Ψ_t against Monte Carlo and identities;
the committed checkpoints and their hash check."""
import math
import shutil

import pytest
import torch

from rewards.gmm import LinearReward, QuadraticReward
from rsmbench.core.checkpoints import load_checkpoint
from rsmbench.core.process import make_process
from rsmbench.data import gmm
from rsmbench.errors import CheckpointError
from rsmbench.run import tasks

N_MC = 400_000


@pytest.fixture(scope="module")
def mix():
    return gmm.toy_mixture()


def test_toy_tilt_matches_the_derivations(mix):
    """Digest §4.3: shift (−½, 0), weights ∝ (e^−1.5, e^1.5, 1); J* = 3 + 1/8 + log mean_k e^{−m_k1/2}."""
    tilted, log_z = LinearReward().tilt(mix, 1.0)
    w = torch.tensor([math.exp(-1.5), math.exp(1.5), 1.0], dtype=torch.float64)
    assert torch.allclose(tilted.weights, w / w.sum(), rtol=1e-12)
    assert torch.allclose(tilted.means - mix.means, torch.tensor([-0.5, 0.0], dtype=torch.float64).expand(3, 2))
    assert abs(log_z - (3.125 + math.log(w.sum().item() / 3))) < 1e-12


@pytest.mark.parametrize("reward,alpha", [(LinearReward(), 1.0), (LinearReward(b=(0.3, -0.7), r0=1.0), 0.5),
                                          (QuadraticReward(), 1.0), (QuadraticReward((1.0, -1.0), 0.8, 2.0), 0.7)])
def test_tilt_is_exact_pointwise_and_by_monte_carlo(mix, reward, alpha):
    tilted, log_z = reward.tilt(mix, alpha)
    x = mix.sample(2000, torch.Generator().manual_seed(1)) * 1.3
    # identity: log p*(x) = log p_ref(x) + r(x)/α − log Z  (float64, to rounding)
    lhs = tilted.log_prob(x)
    rhs = mix.log_prob(x) + reward(x) / alpha - log_z
    assert (lhs - rhs).abs().max().item() < 1e-9
    # Monte Carlo: E_ref[exp(r/α)] and the tilted mean by self-normalised importance weights
    xs = mix.sample(N_MC, torch.Generator().manual_seed(2))
    lw = reward(xs) / alpha
    assert abs((torch.logsumexp(lw, 0) - math.log(N_MC)).item() - log_z) < 0.02
    w = torch.softmax(lw, 0)
    assert ((w[:, None] * xs).sum(0) - tilted.mean()).abs().max().item() < 0.05


def test_j_star_monte_carlo_over_model_samples_converges(mix):
    gt = gmm.GroundTruth(mix, LinearReward(), 1.0, n_exact=512)
    xs = mix.sample(N_MC, torch.Generator().manual_seed(3))
    assert abs(gt.J_star_mc(xs) - gt.J_star_exact) < 0.02
    # J* ≥ E_ref[r] (Jensen), the base model's gap is positive
    assert gt.J_star_exact > LinearReward()(xs).mean().item() + 0.5


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_value_gradient_is_the_marginal_score_difference(mix, kind):
    p = make_process(kind, num_steps=10)
    reward = QuadraticReward()
    tilted, _ = reward.tilt(mix, 1.0)
    for i in (0, 4, 9):
        sc, ns = gmm.marginal_coeffs(p, i)
        # the marginal law by Monte Carlo of the forward process: mean and second moment
        g = torch.Generator().manual_seed(i)
        x0 = tilted.sample(N_MC, g)
        xt = sc * x0 + ns * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        m = tilted.affine(sc, ns)
        assert (xt.mean(0) - m.mean()).abs().max() < 0.03
        var_exact = (m.weights * (m.stds**2 * 2 + (m.means**2).sum(1))).sum() / 2
        assert abs((xt**2).sum(1).mean() / 2 - var_exact) < 0.05 * var_exact
        # Ψ_t = ∇ log p*_t − ∇ log p_ref,t, checked against autograd of the two log-densities
        x = xt[:64].clone().requires_grad_(True)
        lp = tilted.affine(sc, ns).log_prob(x) - mix.affine(sc, ns).log_prob(x)
        (auto,) = torch.autograd.grad(lp.sum(), x)
        assert torch.allclose(gmm.value_gradient(p, i, x.detach(), mix, tilted), auto, atol=1e-10)


def test_linear_value_gradient_at_zero_noise_is_grad_r(mix):
    """At ᾱ → 1 (no noise) Ψ = ∇r/α exactly for a linear reward."""
    tilted, _ = LinearReward().tilt(mix, 1.0)
    x = mix.sample(100, torch.Generator().manual_seed(5))
    psi = tilted.affine(1.0, 0.0).score(x) - mix.affine(1.0, 0.0).score(x)
    assert torch.allclose(psi, torch.tensor([-0.5, 0.0], dtype=torch.float64).expand(100, 2), atol=1e-10)


def test_sliced_wasserstein_floor_and_separation(mix):
    g = torch.Generator().manual_seed(0)
    a, b = mix.sample(4096, g), mix.sample(4096, g)
    shifted = a + torch.tensor([1.0, 0.0], dtype=torch.float64)
    floor = gmm.sliced_wasserstein(a, b)
    assert floor < 0.15 and gmm.sliced_wasserstein(a, shifted) > 0.6  # a shift by 1 projects to ~|cos|


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_committed_checkpoints_load_and_the_hash_is_checked(kind, tmp_path):
    cfg = tasks.load("gmm")
    path = tasks.resolve_path(cfg.processes[kind].model.checkpoint)
    net, meta = load_checkpoint(path, task="gmm")
    assert meta["process"] == kind and meta["pretrain"]["seed"] == 0 and net.prediction == meta["prediction"]
    bad = tmp_path / path.name
    shutil.copy(path, bad), shutil.copy(path.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rsmbench pretrain --task gmm"):
        load_checkpoint(bad, task="gmm")
    with pytest.raises(CheckpointError, match="missing base checkpoint"):
        load_checkpoint(tmp_path / "none.safetensors", task="gmm")


def test_sliced_wasserstein_with_precomputed_target_projections(mix):
    g = torch.Generator().manual_seed(1)
    a, b = mix.sample(1000, g), mix.sample(3000, g)
    direct = gmm.sliced_wasserstein(a, b)
    assert gmm.sliced_wasserstein(a, gmm.SortedProjections(b)) == direct
    assert gmm.sliced_wasserstein(b, a) == direct  # m = min(n_a, n_b) mid-quantiles on both sides
    assert gmm.sliced_wasserstein(a, gmm.SortedProjections(b, seed=1)) != direct  # other directions


def test_gmm_quadratic_task_closed_form_optimum_against_monte_carlo():
    """The bounded task: its file extends gmm (base chain), replaces the reward (not merged into the
    linear one), and its tilt is a Gaussian mixture whose J* = α·log Z and second moments match
    self-normalised importance weights of 4·10^5 base-mixture draws (tolerances ≈ 5 MC standard errors)."""
    cfg = tasks.load("gmm_quadratic")
    assert cfg.reward.name == "gmm_quadratic" and "b" not in cfg.reward.cfg and cfg.processes.flow.model.arch == "mlp"
    reward = tasks.build_reward(cfg)
    gt = tasks.ground_truth(cfg, reward)
    xs = gt.ref.sample(N_MC, torch.Generator().manual_seed(9))
    lw = reward(xs) / gt.alpha
    assert abs(gt.alpha * (torch.logsumexp(lw, 0) - math.log(N_MC)).item() - gt.J_star_exact) < 0.01
    w = torch.softmax(lw, 0)[:, None]
    mean_mc = (w * xs).sum(0)
    cov_mc = (w * (xs - mean_mc)).T @ (xs - mean_mc)
    t = gt.target
    m = t.mean()
    comp = t.means - m
    cov = (t.weights[:, None, None] * (comp[:, :, None] * comp[:, None, :]
                                        + (t.stds**2)[:, None, None] * torch.eye(2, dtype=torch.float64))).sum(0)
    assert (mean_mc - m).abs().max().item() < 0.02 and (cov_mc - cov).abs().max().item() < 0.05
    assert gt.J_star_exact == pytest.approx(-1.3128, abs=1e-3)  # the value the task file states

"""Processes: conversions, Ω identity, log-prob, KL, and agreement with diffusers' schedulers (float64)."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from rsmbench.core.process import DiffusionProcess, FlowProcess, make_process

TOL = dict(rtol=1e-12, atol=1e-12)


def processes():
    return [DiffusionProcess(num_steps=10, eta=1.0), DiffusionProcess(num_steps=50, eta=0.5),
            FlowProcess(num_steps=10, noise_level=0.7, shift=3.0), FlowProcess(num_steps=6, shift=1.0)]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("p", processes(), ids=lambda p: f"{p.kind}{p.num_steps}")
def test_score_roundtrip_and_omega_identity(p):
    x, o1, o2 = rand(5, 3, seed=1), rand(5, 3, seed=2), rand(5, 3, seed=3)
    for i in range(p.num_steps):
        s1 = p.to_score(x, o1, i)
        if p.kind == "flow" and p.t[i] == 1.0:
            # at t = 1 the score is −x whatever v is: the score map is not invertible there
            torch.testing.assert_close(s1, -x, **TOL)
            continue
        torch.testing.assert_close(p.from_score(x, s1, i), o1, **TOL)
        # μ_θ − μ_ref = Ω·(s_θ − s_ref)
        dmu = p.mean(x, o1, i) - p.mean(x, o2, i)
        torch.testing.assert_close(dmu, p.omega(i) * (s1 - p.to_score(x, o2, i)), rtol=1e-10, atol=1e-12)


def test_tweedie_inverts_forward_process():
    p = DiffusionProcess(num_steps=10)
    x0, eps = rand(4, 2, seed=4), rand(4, 2, seed=5)
    for i in (0, 5, 9):
        ab = p.alphas_cumprod_t[i]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        torch.testing.assert_close(p.tweedie(xt, eps, i), x0, **TOL)
        torch.testing.assert_close(p.to_score(xt, eps, i), -eps / (1 - ab).sqrt(), **TOL)
    f = FlowProcess(num_steps=10)
    for i in (1, 5, 9):
        t = f.t[i]
        xt = (1 - t) * x0 + t * eps
        v = eps - x0
        torch.testing.assert_close(f.tweedie(xt, v, i), x0, **TOL)
        # score of N((1−t)x0, t²I) at xt given x0: −(xt − (1−t)x0)/t² = −eps/t
        torch.testing.assert_close(f.to_score(xt, v, i), -eps / t, **TOL)


@pytest.mark.parametrize("p", processes()[:1] + processes()[2:3], ids=["diffusion", "flow"])
def test_log_prob_matches_torch_normal(p):
    x, o = rand(6, 4, seed=6), rand(6, 4, seed=7)
    for i in range(p.num_steps):
        mu = p.mean(x, o, i)
        xn = mu + p.std(i) * rand(6, 4, seed=8 + i)
        ref = torch.distributions.Normal(mu, p.std(i)).log_prob(xn).mean(dim=1)
        torch.testing.assert_close(p.log_prob(xn, mu, i), ref, **TOL)


@pytest.mark.parametrize("p", processes()[:1] + processes()[2:3], ids=["diffusion", "flow"])
def test_closed_form_kl_against_monte_carlo_and_zero_for_identical(p):
    i = p.num_steps // 2
    x, oa, ob = rand(1, 3, seed=9), rand(1, 3, seed=10), rand(1, 3, seed=11)
    ma, mb = p.mean(x, oa, i), p.mean(x, ob, i)
    n = 400_000
    xs = ma + p.std(i) * rand(n, 3, seed=12)
    mc = (p.log_prob(xs, ma.expand(n, 3), i) - p.log_prob(xs, mb.expand(n, 3), i)).mean()
    kl = p.kl(ma, mb, i)[0]
    se = (p.log_prob(xs, ma.expand(n, 3), i) - p.log_prob(xs, mb.expand(n, 3), i)).std() / math.sqrt(n)
    assert abs(mc - kl) < 5 * se + 1e-12, (mc, kl, se)
    assert p.kl(ma, ma, i).abs().max() == 0
    # ratio = 1 for identical policies
    xn = ma + p.std(i) * rand(1, 3, seed=13)
    assert torch.exp(p.log_prob(xn, ma, i) - p.log_prob(xn, p.mean(x, oa.clone(), i), i)).item() == 1.0


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_matches_diffusers(eta):
    p = DiffusionProcess(num_steps=50, eta=eta)
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    sch.set_timesteps(50)
    assert torch.equal(sch.timesteps.long(), p.timesteps)
    x, eps = rand(3, 4, 8, 8, seed=14), rand(3, 4, 8, 8, seed=15)
    for i, t in enumerate(sch.timesteps):
        xi = rand(3, 4, 8, 8, seed=100 + i)
        ours, _ = p.step(x, eps, i, xi, stochastic=eta > 0)
        theirs = sch.step(eps, t, x, eta=eta, variance_noise=xi).prev_sample
        # diffusers keeps ᾱ and its arithmetic in float32: agreement is to float32 precision
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)
    assert torch.all(p.sde.std[-1] > 0) if eta > 0 else True  # final step never has σ = 0


def test_ddpm_is_ddim_eta_one_on_non_final_steps():
    p = DiffusionProcess(num_steps=20, eta=1.0)
    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         clip_sample=False)
    sch.set_timesteps(20)
    x, eps = rand(2, 3, seed=16), rand(2, 3, seed=17)
    # diffusers' DDPM posterior mean = our η = 1 mean (its final step uses ᾱ_prev = 1, ours ᾱ_0)
    for i, t in enumerate(p.timesteps[:-1]):
        gen = torch.Generator().manual_seed(0)
        out = sch.step(eps, int(t), x, generator=gen).prev_sample
        xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        ours, _ = p.step(x, eps, i, xi)
        torch.testing.assert_close(ours, out, rtol=1e-6, atol=1e-6)  # float32 tables


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_ode_step_matches_diffusers_euler(shift):
    p = FlowProcess(num_steps=10, shift=shift)
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(10)
    x, v = rand(2, 4, 8, 8, seed=18), rand(2, 4, 8, 8, seed=19)
    for i, t in enumerate(sch.timesteps):
        ours, _ = p.step(x, v, i, stochastic=False)
        theirs = sch.step(v, t, x).prev_sample
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)  # diffusers holds σ in float32


def test_sd3_grid_and_flow_sde_constants():
    p = FlowProcess(num_steps=10, noise_level=0.7, shift=3.0)
    s = torch.linspace(1, 1e-3, 10, dtype=torch.float64)
    # derivations §2.3 grid; diffusers shifts its σ_min twice, so the last σ is 0.0089 rather than 0.003
    torch.testing.assert_close(p.t[:-1], (3 * s / (1 + 2 * s))[:-1], rtol=5e-3, atol=5e-3)
    assert 0 < p.t[-1] < 0.01 and p.sigmas[-1] == 0
    # c_t = 1 + a²/2 for t < 1 and 1 at the t = 1 edge (derivations §5.3 table)
    c = -p.sde.B / p.dt
    assert abs(c[0].item() - 1.0) < 1e-12
    torch.testing.assert_close(c[1:], torch.full_like(c[1:], 1 + 0.49 / 2), rtol=1e-12, atol=1e-12)
    # σ̃ at t = 1 uses sigmas[1] in the denominator
    assert abs(p.sigma_tilde[0].item() - 0.7 * math.sqrt(1 / (1 - p.sigmas[1].item()))) < 1e-12


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown process"):
        make_process("ddim")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        DiffusionProcess(eta=1.5)
    p = DiffusionProcess(num_steps=4)
    with pytest.raises(ValueError, match="does not match state shape"):
        p.mean(rand(2, 3), rand(2, 4), 0)
    with pytest.raises(ValueError, match="deterministic"):
        DiffusionProcess(num_steps=4, eta=0.0).log_prob(rand(2, 3), rand(2, 3), 0)

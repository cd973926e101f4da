"""Reward-backprop family (DRaFT, AlignProp, ReFL, Adjoint Matching, RSM first-order): the
differentiable replay, the adjoints, and the pathwise-gradient = Σ_steps RSM-terms identity.

All checks in float64; "agree" means max|g₁ − g₂| / max|g₁| ≤ 1e-9 (``rel``)."""
import pytest
import torch

from rsmbench.core.adjoint import chain_adjoint, lean_adjoint
from rsmbench.core.diffrollout import draw_truncation, forward_noise, replay, reward_and_grad
from rsmbench.core.method import Context, get
from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.process import make_process
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import rsm_loss
from rsmbench.harness import equivalence

TOL = 1e-9


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def image_reward(x, cond=None):
    """A smooth reward on (B, C, H, W) images."""
    return -0.5 * ((x - 0.3) ** 2).mean(dim=(1, 2, 3)) + torch.sin(2 * x[:, 0]).mean(dim=(1, 2))


def make_ctx(method, kind, arch="mlp", num_steps=6, hp=None, noise_level=0.7):
    m = get(method)
    pkw = dict(num_steps=num_steps) if kind == "diffusion" else dict(num_steps=num_steps, noise_level=noise_level)
    p = make_process(kind, **pkw)
    if arch == "mlp":
        kw, shape, reward = dict(dim=2, hidden=32, depth=2, temb=16, num_classes=2), (2,), equivalence.toy_reward
    else:
        kw = dict(sample_size=8, channels=3, block_out_channels=(8, 16), norm_num_groups=4, num_classes=2)
        shape, reward = (3, 8, 8), image_reward
    net = build_net(arch, p.prediction, seed=0, dtype=torch.float64, **kw)
    ref = frozen_copy(build_net(arch, p.prediction, seed=1, dtype=torch.float64, **kw))
    ctx = Context(process=p, policy=Policy(net, p, 1.5), ref=Policy(ref, p, 1.5),
                  behaviour=Policy(frozen_copy(net), p, 1.5), reward=reward, hp=m.hparams(**(hp or {})), shape=shape)
    return m, ctx


def collect(m, ctx, n=4, seed=0):
    cond = torch.arange(n) % 2
    batch = m.collect(ctx, cond, [seed * 100 + k for k in range(n)])
    m.prepare(batch, ctx)
    return batch


def grads(m, batch, ctx, perturb=None):
    params = [p for p in ctx.policy.net.parameters()]
    g_o = equivalence.flat_grad(m.original_loss(batch, ctx), params)
    spec = m.rsm_spec(batch, ctx)
    if perturb is not None:
        spec = perturb(spec)
    g_r = equivalence.flat_grad(rsm_loss(ctx.policy, ctx.ref, spec), params)
    return g_o, g_r


# ---- the differentiable replay -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["diffusion", "flow"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_replay_reproduces_behaviour_states(kind, stochastic):
    _, ctx = make_ctx("draft", kind)
    mask = torch.full((ctx.process.num_steps,), stochastic)
    cond = torch.tensor([0, 1, 1])
    ro = sample(ctx.behaviour, ctx.shape, generators([1, 2, 3]), cond=cond, stochastic=mask, dtype=torch.float64)
    states = replay(ctx.policy, ro.states[:, 0], ro.noises, cond, mask, k=2, all_states=True)
    assert torch.equal(states.detach(), ro.states)
    params = list(ctx.policy.net.parameters())
    n = ctx.process.num_steps  # states 0 … n−2 come from no-grad steps; n−1 and n from the last k = 2
    early = torch.autograd.grad(states[:, n - 2].sum(), params, allow_unused=True, retain_graph=True)
    late = torch.autograd.grad(states[:, n - 1].sum(), params, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in early)
    assert any(g is not None and g.abs().max() > 0 for g in late)


def test_checkpointing_gives_the_same_gradient():
    _, ctx = make_ctx("alignprop", "diffusion", arch="unet", num_steps=3)
    cond = torch.tensor([0, 1])
    ro = sample(ctx.behaviour, ctx.shape, generators([5, 6]), cond=cond, dtype=torch.float64)
    params = list(ctx.policy.net.parameters())
    gs = []
    for ck in (False, True):
        x = replay(ctx.policy, ro.states[:, 0], ro.noises, cond, k=2, checkpoint=ck)
        gs.append(equivalence.flat_grad(image_reward(x).sum(), params))
    assert gs[0].abs().max() > 0 and rel(gs[0], gs[1]) <= 1e-12


def test_truncation_draw_is_seeded_and_in_range():
    ks = [draw_truncation(s, 1, 8) for s in range(200)]
    assert ks == [draw_truncation(s, 1, 8) for s in range(200)]
    assert min(ks) == 1 and max(ks) == 8
    _, ctx = make_ctx("alignprop", "flow", num_steps=8)
    m = get("alignprop")
    b1, b2 = collect(m, ctx, seed=0), collect(m, ctx, seed=0)
    assert b1.extras["K"] == b2.extras["K"] and 1 <= b1.extras["K"] <= 8
    assert len(b1.rows) == 4 * b1.extras["K"]
    assert {collect(m, ctx, seed=s).extras["K"] for s in range(12)} != {b1.extras["K"]}


def test_forward_noise_matches_the_marginals():
    p = make_process("diffusion", num_steps=10)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    ab = p.alphas_cumprod_t[9]
    assert torch.allclose(forward_noise(p, x0, 9, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    f = make_process("flow", num_steps=10)
    assert torch.allclose(forward_noise(f, x0, 9, eps), (1 - f.t[9]) * x0 + f.t[9] * eps)


# ---- adjoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,stochastic", [("flow", False), ("flow", True), ("diffusion", True)])
def test_lean_adjoint_is_autograd_through_the_frozen_base_chain(kind, stochastic):
    """ODE, or memoryless SDE with its noises held fixed: ã_j = −λ·d r(x_N)/d x_j through μ_ref."""
    noise_level = 2 ** 0.5  # the memoryless rectified-flow schedule
    _, ctx = make_ctx("adjoint_matching", kind, noise_level=noise_level)
    N, lam = ctx.process.num_steps, 3.0
    mask = torch.full((N,), stochastic)
    cond = torch.tensor([0, 1, 0])
    ro = sample(ctx.ref, ctx.shape, generators([7, 8, 9]), cond=cond, stochastic=mask, dtype=torch.float64)
    _, g = reward_and_grad(ctx.reward, ro.final, cond)
    adj = lean_adjoint(ctx.ref, ro, g, reward_scale=lam)
    for j in (0, 2, N - 1):
        x = ro.states[:, j].clone().requires_grad_(True)
        xN = replay(ctx.ref, x, ro.noises[:, j:], cond, mask, start_step=j)
        (auto,) = torch.autograd.grad(ctx.reward(xN, cond).sum(), x)
        assert rel(-lam * auto, adj[:, j]) <= TOL
    assert torch.equal(adj[:, N], -lam * g)


def test_chain_adjoint_is_autograd_through_the_behaviour_chain_on_images():
    _, ctx = make_ctx("draft", "diffusion", arch="unet", num_steps=3)
    cond = torch.tensor([1, 0])
    ro = sample(ctx.behaviour, ctx.shape, generators([3, 4]), cond=cond, dtype=torch.float64)
    _, g = reward_and_grad(ctx.reward, ro.final, cond)
    adj = chain_adjoint(ctx.behaviour, ro, g)
    x = ro.states[:, 0].clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(ctx.reward(replay(ctx.behaviour, x, ro.noises, cond), cond).sum(), x)
    assert rel(auto, adj[:, 0]) <= TOL


# ---- DRaFT / AlignProp: pathwise gradient = Σ_steps of RSM terms with the adjoint Ψ̂ ---------------

def per_step_sum(ctx, batch, K):
    """Σ_{i ≥ N−K} a_{i+1}ᵀ·B_i·∂o_θ(x_i)/∂θ averaged over samples, built by hand from the adjoint."""
    ro, N = batch.rollout, ctx.process.num_steps
    adj = chain_adjoint(ctx.behaviour, ro, batch.extras["terminal_grad"], first=N - K)
    params = list(ctx.policy.net.parameters())
    total = 0.0
    for i in range(N - K, N):
        out = ctx.policy(ro.states[:, i], i, batch.cond)
        B = ctx.process.table(bool(ro.stochastic[i])).B[i].to(out.dtype)
        total = total + (B * adj[:, i + 1] * out).sum() / ro.batch_size
    return -equivalence.flat_grad(total, params)  # the original minimises −r


@pytest.mark.parametrize("kind,k,stochastic", [("diffusion", 1, True), ("diffusion", 3, False),
                                               ("diffusion", None, True), ("flow", 1, False), ("flow", 3, True),
                                               ("flow", None, False)])
def test_draft_gradient_is_the_sum_over_steps_of_rsm_terms(kind, k, stochastic):
    m, ctx = make_ctx("draft", kind, hp=dict(k=k, stochastic=stochastic))
    batch = collect(m, ctx)
    K = batch.extras["K"]
    assert K == (ctx.process.num_steps if k is None else k) and len(batch.rows) == 4 * K
    g_o, g_r = grads(m, batch, ctx)
    assert g_o.abs().max() > 0
    assert rel(g_o, g_r) <= TOL
    assert rel(g_o, per_step_sum(ctx, batch, K)) <= TOL


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_draft_k3_detects_a_missing_step_count(kind):
    """C1·a² = D·K/2: dropping the K (mean over rows taken as the original's sum) must fail."""
    m, ctx = make_ctx("draft", kind, hp=dict(k=3))
    batch = collect(m, ctx)

    def no_k(spec):
        spec.c1 = spec.c1 / 3
        return spec

    g_o, g_r = grads(m, batch, ctx, no_k)
    assert rel(g_o, g_r) > 0.5


@pytest.mark.parametrize("method,hp", [("draft", dict(lv_draws=2)), ("alignprop", dict(reward_loss="abs_target",
                                                                                        reward_target=0.5))])
@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_lv_and_target_losses_agree(method, hp, kind):
    m, ctx = make_ctx(method, kind, hp=hp)
    batch = collect(m, ctx)
    if method == "alignprop":  # |target − r| with the target inside the batch's rewards: ω = ±1
        ctx.hp["reward_target"] = batch.rewards.sort().values[1:3].mean().item()  # the median: both signs
    else:
        assert len(batch.rows) == 8 and (batch.rows.step == ctx.process.num_steps - 1).all()
    g_o, g_r = grads(m, batch, ctx)
    assert g_o.abs().max() > 0 and rel(g_o, g_r) <= TOL


@pytest.mark.parametrize("method,kind", [("draft", "flow"), ("rsm_fo", "diffusion"), ("refl", "diffusion"),
                                         ("adjoint_matching", "flow")])
def test_image_shaped_states(method, kind):
    hp = {"draft": dict(k=2), "adjoint_matching": dict(train_timesteps=2)}.get(method)  # 3 steps: 1 early + 1 late
    m, ctx = make_ctx(method, kind, arch="unet", num_steps=3, hp=hp)
    batch = collect(m, ctx, n=2)
    g_o, g_r = grads(m, batch, ctx)
    assert g_o.abs().max() > 0 and rel(g_o, g_r) <= TOL


def test_refl_margin_switches_off_saturated_samples():
    m, ctx = make_ctx("refl", "diffusion", hp=dict(reward_target=-1e6))  # every r above the margin
    batch = collect(m, ctx)
    g_o, g_r = grads(m, batch, ctx)
    assert g_o.abs().max() == 0 and g_r.abs().max() == 0

"""First-order matching family (VGG-Flow, SQDF, residual ∇-DB): estimators, clipping, weights, the
approximate (unpruned) gaps, and both formulations on image-shaped states. Tolerances: float64,
relative 1e-9 for identities, as the harness."""
import math

import pytest
import torch

from rsmbench.core import weights
from rsmbench.core.estimators import first as fo
from rsmbench.core.gradclip import FixedClip, QuantileClip, clip_by_norm, make_clipper
from rsmbench.core.method import Context, get
from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.process import make_process
from rsmbench.harness import equivalence
from tests.helpers import tiny_policy


def reward(x, cond=None):
    """Smooth, shape-agnostic: per-sample sum over elements (a scalar r per sample)."""
    z = x.reshape(x.shape[0], -1)
    return -0.5 * ((z - 0.3) ** 2).sum(1) + torch.sin(2.0 * z).sum(1)


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- reward-gradient clipping ------------------------------------------------------------------

def test_clip_by_norm_hand_values():
    g = torch.tensor([[3.0, 0.0], [0.5, 0.0], [0.0, 4.0]], dtype=torch.float64)
    out = clip_by_norm(g, 1.0)
    expect = torch.tensor([[3 / (3 + 1e-8), 0], [0.5 * 0.5 / (0.5 + 1e-8), 0], [0, 4 / (4 + 1e-8)]],
                          dtype=torch.float64)
    assert torch.allclose(out, expect, rtol=0, atol=1e-15)
    img = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    img[0, 0, 0, 0], img[0, 2, 1, 1], img[1, 1, 0, 1] = 3.0, 4.0, 0.25  # norms 5 and 0.25
    out = clip_by_norm(img, 2.0)
    assert math.isclose(out[0, 0, 0, 0].item(), 3 / (5 + 1e-8) * 2, rel_tol=1e-14)
    assert math.isclose(out[0, 2, 1, 1].item(), 4 / (5 + 1e-8) * 2, rel_tol=1e-14)
    assert math.isclose(out[1, 1, 0, 1].item(), 0.25 * 0.25 / (0.25 + 1e-8), rel_tol=1e-14)


def test_quantile_clip_rule():
    clip = QuantileClip(quantile=0.8, reset_value=1.0)
    g1 = torch.tensor([[3.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    g2 = torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    assert clip.threshold == 1.0
    out = clip(g1)
    assert math.isclose(out[0, 0].item(), 3 / (3 + 1e-8), rel_tol=1e-14)  # clipped to norm 1
    clip(g2)
    clip(torch.tensor([[100.0, 0.0]], dtype=torch.float64), record=False)  # clip only, not recorded
    # norms recorded since the last step: 3, 0.5, 4 → sorted (0.5, 3, 4); 0.8-quantile at
    # position 0.8·2 = 1.6 → 3 + 0.6·(4 − 3) = 3.6 (torch.quantile's linear interpolation)
    assert math.isclose(clip.step(), 3.6, rel_tol=1e-12) and math.isclose(clip.threshold, 3.6, rel_tol=1e-12)
    out = clip(g2)
    assert math.isclose(out[0, 1].item(), 4 / (4 + 1e-8) * 3.6, rel_tol=1e-14)
    assert math.isclose(clip.step(), 4.0, rel_tol=1e-12)  # only the norm 4 since the last step
    assert clip.step() == 4.0  # nothing recorded: τ kept
    clip.reset()
    assert clip.threshold == 1.0


def test_make_clipper_modes():
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert torch.equal(make_clipper(None)(g), g) and torch.equal(make_clipper("none")(g), g)
    fixed = make_clipper("fixed", 2.5)
    assert isinstance(fixed, FixedClip)
    assert math.isclose(torch.linalg.vector_norm(fixed(g)).item(), 2.5 * 5 / (5 + 1e-8), rel_tol=1e-14)
    assert isinstance(make_clipper("quantile"), QuantileClip)
    with pytest.raises(ValueError, match="threshold"):
        make_clipper("fixed")
    with pytest.raises(ValueError, match="unknown clipping mode"):
        make_clipper("median")


# ---- estimators ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["diffusion", "flow"])
@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_lookahead_zero_equals_current_state(kind, arch):
    small = {} if arch == "mlp" else dict(block_out_channels=(8,), norm_num_groups=4)
    pol, _ = tiny_policy(kind, arch, num_steps=5, cfg_scale=1.5, **small)
    shape = (4, 2) if arch == "mlp" else (4, 3, 8, 8)
    x, step, cond = _x(shape), torch.tensor([0, 1, 3, 4]), torch.tensor([0, 1, 0, 1])
    for jac in (True, False):
        a = fo.current_state(pol, reward, x, step, cond, jacobian=jac)
        b = fo.lookahead(pol, reward, x, step, cond, k=0, jacobian=jac)
        assert torch.allclose(a, b, rtol=0, atol=1e-12) and a.abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_lookahead_one_step_by_hand(kind):
    pol, _ = tiny_policy(kind, num_steps=4)
    p = pol.process
    x, step = _x((3, 2), 1), torch.tensor([0, 2, 3])  # the last row steps past the end: x̂0 = x'
    xg = x.clone().requires_grad_(True)
    rows = []
    for b in range(3):
        i = int(step[b])
        z, _ = p.step(xg[b:b + 1], pol(xg[b:b + 1], i), i, stochastic=False)
        x0 = z if i + 1 >= p.num_steps else p.tweedie(z, pol(z, i + 1), i + 1)
        rows.append(torch.autograd.grad(reward(x0).sum(), xg)[0][b])
    assert torch.allclose(fo.lookahead(pol, reward, x, step, None, k=1), torch.stack(rows), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_jacobian_flag(kind):
    pol, _ = tiny_policy(kind, num_steps=5)
    p = pol.process
    x, step = _x((4, 2), 2), torch.tensor([0, 1, 2, 3])
    exact = fo.current_state(pol, reward, x, step, jacobian=True)
    detached = fo.current_state(pol, reward, x, step, jacobian=False)
    assert (exact - detached).abs().max() > 1e-4  # o_θ depends on x: the flag matters
    # detached output: ∇_x r(x̂0) = (∂x̂0/∂x)|_o·∇r(x̂0), identity (flow) or 1/√ᾱ_t (diffusion)
    with torch.no_grad():
        x0 = p.tweedie(x, pol(x, step), step)
    x0 = x0.requires_grad_(True)
    g0 = torch.autograd.grad(reward(x0).sum(), x0)[0]
    scale = 1 / p.alphas_cumprod_t[step].sqrt() if kind == "diffusion" else torch.ones(4, dtype=torch.float64)
    assert torch.allclose(detached, scale[:, None] * g0, rtol=1e-12, atol=1e-12)
    # an output that ignores x: both flags give the same gradient
    with torch.no_grad():
        pol.net.net[0].weight[:, :2] = 0
    a = fo.current_state(pol, reward, x, step, jacobian=True)
    b = fo.current_state(pol, reward, x, step, jacobian=False)
    assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_next_state_after_last_step_is_terminal_gradient():
    pol, _ = tiny_policy("diffusion", num_steps=3)
    from rsmbench.core.rollout import generators, sample
    rows = sample(pol, (2,), generators([0, 1]), dtype=torch.float64).transitions()
    G = fo.next_state(pol, reward, rows)
    last = rows.step == 2
    xn = rows.x_next[last].clone().requires_grad_(True)
    assert torch.allclose(G[last], torch.autograd.grad(reward(xn).sum(), xn)[0], rtol=0, atol=1e-14)
    # interior rows: Tweedie at step i+1 with the policy, exact Jacobian
    i = 0
    xi = rows.x_next[rows.step == i].clone().requires_grad_(True)
    x0 = pol.process.tweedie(xi, pol(xi, i + 1), i + 1)
    assert torch.allclose(G[rows.step == i], torch.autograd.grad(reward(x0).sum(), xi)[0], rtol=0, atol=1e-12)


# ---- weights --------------------------------------------------------------------------------------

def test_discount_and_kappa_by_hand():
    p = make_process("diffusion", num_steps=8)
    pol, _ = tiny_policy("diffusion", num_steps=8)
    from rsmbench.core.rollout import generators, sample
    rows = sample(Policy(pol.net, p), (2,), generators([0]), dtype=torch.float64).transitions()
    d = weights.discount(p, rows, 0.9)
    assert math.isclose(d[0].item(), 0.9**7, rel_tol=1e-14) and d[-1].item() == 1.0
    ab = p.scheduler.alphas_cumprod.double()
    assert math.isclose(weights.nabla_db_kappa(p, rows)[0].item(), ab[p.timesteps[0] - 125].item(), rel_tol=1e-14)
    assert math.isclose(weights.nabla_db_kappa(p, rows)[-1].item(), ab[0].item(), rel_tol=1e-14)  # clamped t' = 0
    c1 = weights.transition_matching(p, rows, 2.0)
    assert math.isclose(c1[3].item(), (2.0 * p.sde.B[3] / p.sde.std[3] ** 2).item() ** 2, rel_tol=1e-14)


@pytest.mark.parametrize("method,process,hp", [
    ("vgg_flow", "flow", {"eta_mode": "linear", "unet_reg_scale": 0.3, "reward_scale": 2.0}),
    ("vgg_flow", "flow", {"clip": "none"}),
    ("nabla_db", "diffusion", {"reward_adaptive_mode": "sigma", "pretrained_strength": 0.5}),
    ("nabla_db", "diffusion", {"reward_adaptive_mode": "sqrt", "forward_loss_scale": 3.0, "unet_reg_scale": 0.0}),
    ("sqdf", "diffusion", {"lookahead_steps": 3, "gamma_d": 0.5, "alpha": 0.2}),
])
def test_hyperparameter_variants_stay_exact(method, process, hp):
    rec = equivalence.check(method, process, "float64", hp=hp, offpolicy_steps=0)
    assert rec.max_rel_err <= 1e-9 and rec.passed, rec
    if rec.kind == "loss":
        assert rec.loss_rel_err <= 1e-9


# ---- unpruned originals: the approximate gap, and its limit --------------------------------------

@pytest.mark.parametrize("method,process,preset,scale_key", [
    ("vgg_flow", "flow", "toy_value_net", "value_scale"),
    ("nabla_db", "diffusion", "toy_flow_net", "flow_scale"),
])
def test_unpruned_gap_vanishes_with_auxiliary_output(method, process, preset, scale_key):
    rec = equivalence.check(method, process, "float64", hp={"preset": preset}, offpolicy_steps=0)
    assert rec.kind == "approximate" and "→ 0" in rec.reason and rec.passed
    assert rec.max_rel_err > 1e-5, rec  # the learned auxiliary network moves the target: a real gap
    # shrink the auxiliary output on one batch: the gap is linear in the scale and vanishes
    m = get(method)
    ctx = equivalence.build_context(m, process, torch.float64, hp={"preset": preset})
    batch = equivalence.collect(m, ctx)
    gaps = []
    for s in (1.0, 1e-3, 1e-10, 0.0):
        ctx.hp[scale_key] = s
        gaps.append(equivalence.compare(*equivalence.both_gradients(m, batch, ctx)[:2])["max_rel_err"])
    assert math.isclose(gaps[0], rec.max_rel_err, rel_tol=1e-9), (gaps, rec.max_rel_err)
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert 0.5e-3 < gaps[1] / gaps[0] < 2e-3 and 0.5e-7 < gaps[2] / gaps[1] < 2e-7, gaps  # linear in the scale
    assert gaps[2] <= 1e-9 and gaps[3] <= 1e-9, gaps


@pytest.mark.parametrize("method,process,preset,aux", [
    ("vgg_flow", "flow", "toy_value_net", "value_net"),
    ("nabla_db", "diffusion", "toy_flow_net", "flow_net"),
])
def test_auxiliary_losses_train_the_auxiliary_network(method, process, preset, aux):
    m = get(method)
    ctx = equivalence.build_context(m, process, torch.float64, hp={"preset": preset})
    batch = equivalence.collect(m, ctx)
    loss = m.original_loss(batch, ctx)
    net = getattr(m, aux)(ctx)
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # the pruned original has no auxiliary term: its loss is exactly the RSM loss value
    m2 = get(method)
    ctx2 = equivalence.build_context(m2, process, torch.float64)
    b2 = equivalence.collect(m2, ctx2)
    from rsmbench.core.rsm import rsm_loss
    lo, lr = m2.original_loss(b2, ctx2).item(), rsm_loss(ctx2.policy, ctx2.ref, m2.rsm_spec(b2, ctx2)).item()
    assert abs(lo - lr) <= 1e-12 * abs(lo)


def test_quantile_threshold_update_hook():
    m = get("vgg_flow")
    ctx = equivalence.build_context(m, "flow", torch.float64)
    batch = equivalence.collect(m, ctx)
    m.original_loss(batch, ctx)
    norms = fo.current_state(ctx.policy, ctx.reward, batch.rows.x, batch.rows.step, batch.rows.cond, jacobian=False)
    expect = torch.quantile(torch.linalg.vector_norm(norms, dim=1), 0.8).item()
    m.on_optimizer_step()
    assert math.isclose(m.clipper(ctx).threshold, expect, rel_tol=1e-12)
    equivalence.collect(m, ctx)  # a new epoch resets τ
    assert m.clipper(ctx).threshold == 1.0


# ---- image-shaped states (B, C, H, W): both formulations agree -------------------------------------

def _image_context(m, kind, hp):
    p = make_process(kind, num_steps=4)
    kw = dict(sample_size=8, channels=3, block_out_channels=(8,), norm_num_groups=4, num_classes=2)
    net = build_net("unet", p.prediction, seed=0, dtype=torch.float64, **kw)
    ref = frozen_copy(build_net("unet", p.prediction, seed=1, dtype=torch.float64, **kw))
    return Context(process=p, policy=Policy(net, p, 1.5), ref=Policy(ref, p, 1.5),
                   behaviour=Policy(frozen_copy(net), p, 1.5), reward=reward, hp=m.hparams(**hp), shape=(3, 8, 8))


@pytest.mark.parametrize("method,kind,hp", [
    ("vgg_flow", "flow", {"reward_scale": 0.5, "unet_reg_scale": 0.1}),
    ("sqdf", "diffusion", {"lookahead_steps": 1, "alpha": 0.5}),
    ("nabla_db", "diffusion", {"reward_scale": 0.01}),
])
def test_image_states_agree(method, kind, hp):
    m = get(method)
    ctx = _image_context(m, kind, hp)
    batch = m.collect(ctx, torch.tensor([0, 1]), [5, 6])
    m.prepare(batch, ctx)
    g_o, g_r, l_o, l_r = equivalence.both_gradients(m, batch, ctx)
    res = equivalence.compare(g_o, g_r)
    assert res["max_rel_err"] <= 1e-9 and abs(res["cosine"] - 1) <= 1e-9, res
    if m.kind == "loss":
        assert abs(l_o - l_r) <= 1e-9 * abs(l_o)

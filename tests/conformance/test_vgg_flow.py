"""VGG-Flow (pruned: no value network) against the RSM repo's port (jaylee2000/rsm@e8be3df
sd35_first_order/lib/vggflow), which follows lzzcd001/vggflow@978f1fb; and the original's timestep
subsampling. Relative tolerance 1e-10, float64, at θ ≠ θ† (``loss`` kind). Without CFG: the code
detaches the unconditional branch of v_θ (a stated deviation), moot at guidance scale 1.
"""
import pytest
import torch

from rsmbench.core import weights
from tests.conformance._first_order import TOL, clip_norm, move_theta, perturbed, rel, setup, value_and_grad

HP = {"reward_scale": 3.0, "eta_mode": "quad", "unet_reg_scale": 0.5}
CONSTS = {"reward_scale": 3.0, "eta_power": 2.0, "tau": 1.0, "unet_reg_scale": 0.5}


def authors_loss(ctx, rows, reward_scale, eta_power, tau, unet_reg_scale):
    """jaylee2000/rsm@e8be3df sd35_first_order/lib/vggflow/algorithm.py:56-78 (x̂_1 = x_t + (σ_last − σ)·
    sg(v_θ), σ_last = ``scheduler.sigmas[-1]`` = 0; g = ∇_{x_t} r(x̂_1), clipped at τ,
    reward_gradient.py:161-170), :97-108 (v_tgt = v_ref − η(σ)·λ·g, η = (1 − σ)² 'quad' :277-282),
    train_vggflow.py:391 (τ = 1.0 at the start of training), lib/vggflow/trainer.py:229-259
    (mean((v_θ − sg(v_tgt))²) + unet_reg·mean((v_θ − v_θ†)²)), mean over rows (config/default_config.py:
    reward_scale 3e7, eta_mode quad, unet_reg_scale 0, timestep_fraction 1.0)."""
    sch = ctx.process.scheduler
    sigma = sch.sigmas.double()[rows.step].reshape(-1, 1)
    v = ctx.policy(rows.x, rows.step, rows.cond)
    with torch.enable_grad():
        z = rows.x.detach().requires_grad_(True)
        x1 = z + (sch.sigmas.double()[-1] - sigma) * v.detach()
        (g,) = torch.autograd.grad(ctx.reward(x1, rows.cond).sum(), z)
    g = clip_norm(g, tau)
    v_tgt = ctx.ref(rows.x, rows.step, rows.cond).detach() - (1 - sigma) ** eta_power * reward_scale * g
    return (((v - v_tgt) ** 2).mean(dim=1) + unet_reg_scale * ((v - rows.out_behaviour) ** 2).mean(dim=1)).mean()


@pytest.fixture(scope="module")
def case():
    m, ctx, batch = setup("vgg_flow", "flow", HP, cfg_scale=1.0)
    move_theta(ctx)
    return ctx, batch, value_and_grad(m.original_loss(batch, ctx), ctx)


def test_vgg_flow_loss_is_the_authors(case):
    ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows, **CONSTS), ctx)
    assert rel(lo, lt) <= TOL and rel(go, gt) <= TOL


@pytest.mark.parametrize("name", list(CONSTS))
def test_vgg_flow_check_fails_under_perturbation(case, name):
    ctx, batch, (lo, go) = case
    lt, gt = value_and_grad(authors_loss(ctx, batch.rows, **perturbed(CONSTS, name)), ctx)
    assert max(rel(lo, lt), rel(go, gt)) > TOL


def test_original_vggflow_trains_its_subsampled_steps():
    """lzzcd001/vggflow@978f1fb train_vggflow.py:378-380 (⌊20·0.25⌋ + 1 = 6 steps), :535-558 (the last
    step, then one uniform index per trunk of 4), :575 (``perms.clamp(min=1)``: step 0 is never trained,
    its draws go to step 1). Expected counts per sample from that rule, against 40000 draws."""
    N, f = 20, 0.25
    w = torch.zeros(N, dtype=torch.float64)
    w[N - 1] += 1.0
    for trunk in range(int(N * f)):
        for s in range(trunk * 4, trunk * 4 + 4):
            w[max(s, 1)] += 0.25
    steps = weights.train_steps(N, 40_000, f, True, torch.Generator().manual_seed(1), min_step=1)
    freq = torch.bincount(steps.reshape(-1), minlength=N).double() / 40_000
    assert steps.shape == (40_000, 6) and freq[0] == 0 and ((freq - w).abs() <= 0.012).all()
    from rsmbench.core.method import get
    hp = get("vgg_flow").hparams("vggflow_original")
    got = (hp["timestep_fraction"], hp["min_train_step"], hp["reward_scale"], hp["use_value_net"])
    assert got == (0.25, 1, 1e3, True)

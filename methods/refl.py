"""ReFL: reward feedback learning on a single late, differentiable denoising step.

Paper: Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", arXiv 2304.05977, §4 and Algorithm 1 (ReFL): sample without grad down to a random
late step t ∈ [T1, T2] (40 steps, the last 10 eligible), run the network once *with* grad, predict
x̂₀ directly (Tweedie) and minimise λ·φ(r(x̂₀)), φ = ReLU(2 − r). Code: THUDM/ImageReward@c1392c6
``ImageReward/ReFL.py:712-756`` (``DDPMScheduler``, ``set_timesteps(40)``, ``mid_timestep =
random.randint(30, 39)`` once per batch, the first mid steps without grad, ``pred_original_sample``
of the step at mid, ``F.relu(-rewards + 2)``, ``loss.mean() * args.grad_scale``) and
``scripts/train_refl.sh`` (``--grad_scale 0.001``); the DDPM step is DDIM η = 1 here (the same
posterior). Deliberate deviations, stated: ReFL alternates this with the pre-training loss on a data
set; that regulariser needs training images and is not part of this method file. ReFL's UNet call
has no CFG; guidance is a task setting here.
Table 1 row: not a Table 1 row (derivations §8.11: "ReFL = single late-step Tweedie (current-state)
gradient").
Equivalence kind: ``grad_at_behaviour``. At θ = θ†, with x_j at its rollout value and
x̂₀ = T(x_j, o) the affine Tweedie map of ``rsmbench.core.process``,

    ∇_θ φ(r(x̂₀(θ))) = φ'(r)·∇r(x̂₀)ᵀ·(∂x̂₀/∂o)·∂o_θ(x_j)/∂θ,   ∂x̂₀/∂o = −√(1−ᾱ_j)/√ᾱ_j (ε)

so RSM with the current-state Tweedie estimator with its exact output Jacobian (‡, Table 1
footnote), one row per sample at step j:
    Ψ̂/a = ω·λ·(∂x̂₀/∂o)·∇r(x̂₀^{θ†}),  ω = −φ'(r) = 1[r < 2],  γ = 1,  C1·a² = D/2,  C2 = 0,
    anchor s_θ†.  (Score units: Ψ̂ = a_j·Ψ̂/a = ω·λ·∇r(x̂₀)/√ᾱ_j, since a_j = −1/√(1−ᾱ_j).)
Off θ†, x̂₀ and ∇r(x̂₀) move with θ in the original; RSM keeps them fixed.
"""
from __future__ import annotations

import torch

from rsmbench.core import weights
from rsmbench.core.diffrollout import draw_truncation, reward_and_grad
from rsmbench.core.estimators.first import PHI_LOSSES, check_reward_target, phi_loss, phi_slope, tweedie_pullback
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec


@register
class ReFL(Method):
    id = "refl"
    processes = ("diffusion",)
    published_processes = ("diffusion",)  # SD1.4 (arXiv 2304.05977 §4; THUDM/ImageReward ReFL.py)
    order = "first"
    kind = "grad_at_behaviour"
    table_row = {"psi": 'ω·∇_{x_t} r(x̂₀(x_t)) at one random late step (Tweedie, exact output Jacobian)',
                 "gamma": '1', "c1": 'D/2 (native), anchor s_θ†', "c2": '0', "branching": False,
                 "current_state": True}
    paper = "Xu et al. 2023 (ImageReward), arXiv 2304.05977, §4, Algorithm 1 (ReFL)"
    table1 = "not a Table 1 row (derivations §8.11)"
    kind_reason = "exact at θ = θ†: same x_j; RSM holds x̂₀ and ∇r(x̂₀) at their behaviour values"
    defaults = {"window": hp(10, ge=1), "step_seed": hp(0, ge=0), "reward_scale": hp(1.0, gt=0),
                "reward_loss": hp("relu_margin", choices=PHI_LOSSES), "reward_target": hp(2.0, null=True)}
    strength = "reward_scale"  # the grad scale
    influence_preset = {"diffusion": "imagereward"}
    presets = {
        "imagereward": {"window": 10, "reward_scale": 1e-3, "reward_loss": "relu_margin", "reward_target": 2.0,
                        "source": "THUDM/ImageReward@c1392c6 ImageReward/ReFL.py:714-756 (mid_timestep = "
                                  "randint(30, 39) of 40 steps, loss F.relu(-rewards + 2)·grad_scale) and "
                                  "scripts/train_refl.sh (--grad_scale 0.001)"},
    }

    def collect(self, ctx, cond, seeds) -> Batch:
        """No-grad rollout to the random late step j (drawn once per batch, seeded, stored), then the
        behaviour output at x_j gives x̂₀^{θ†}, whose reward gradient is cached."""
        p = ctx.process
        N = p.num_steps
        K = draw_truncation(int(ctx.hp["step_seed"]) + int(seeds[0]), 1, min(int(ctx.hp["window"]), N))
        j = N - K
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, end_step=j + 1, dtype=_dtype(ctx))
        rows = ro.transitions(only_stochastic=False)
        rows = rows.select(rows.step == j)
        x0_hat = p.tweedie(rows.x, rows.out_behaviour, j)
        r, g = reward_and_grad(ctx.reward, x0_hat, cond)
        return Batch(rollout=ro, rows=rows, rewards=r, cond=cond, extras={"step": j, "x0_grad": g})

    def original_loss(self, batch, ctx):
        hp, rows, j = ctx.hp, batch.rows, batch.extras["step"]
        out = ctx.policy(rows.x, j, rows.cond)
        r = ctx.reward(ctx.process.tweedie(rows.x, out, j), rows.cond)
        return hp["reward_scale"] * phi_loss(r, hp["reward_loss"], hp["reward_target"]).mean()

    def rsm_spec(self, batch, ctx):
        hp, rows = ctx.hp, batch.rows
        omega = hp["reward_scale"] * phi_slope(batch.rewards, hp["reward_loss"], hp["reward_target"])
        psi = tweedie_pullback(ctx.process, rows, batch.extras["x0_grad"][rows.sample], omega[rows.sample])
        return RSMSpec(rows=rows, psi=psi, gamma=torch.ones(len(rows)), c1=weights.pathwise(rows, 1),
                       c2=torch.zeros(len(rows)), anchor="behaviour")

    def check_hparams(self, hp):
        check_reward_target(hp)

    def influence_signal(self, batch, ctx, rows):
        return batch.extras["x0_grad"][rows.sample]  # ∇r at the row's x̂₀ (derivations §8.11)

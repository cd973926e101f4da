"""Adjoint Matching: regress the control onto the lean adjoint along memoryless trajectories.

Paper: Domingo-Enrich, Drozdzal, Karrer, Chen 2024, "Adjoint Matching: Fine-tuning Flow and
Diffusion Generative Models with Memoryless Stochastic Optimal Control", arXiv 2409.08861, §4:
the lean adjoint ODE dã/dt = −(∇_x b(X_t, t))ᵀ·ã, ã(1) = ∇g(X_1) = −λ∇r(X_1) through the *base*
drift b, and the Adjoint Matching loss Σ_t ½‖u_θ(X_t, t) + σ(t)ᵀ·ã(t)‖² with the controlled
drift b + σ·u and the memoryless noise schedule (σ(t)² = 2η_t; diffusers-time rectified flow:
σ(t)² = 2t/(1−t), i.e. Flow-GRPO noise level √2; VP diffusion: DDPM, η = 1).
Discretised on the sampler grid (``rsmbench.core.process``: x' = μ + σ_i·ξ, σ_i = σ(t)·√Δt): the
control's mean shift is μ_θ − μ_base = σ(t)·u·Δt, so u·√Δt = (μ_θ − μ_ref)/σ_i, and the step's
control acts on x_{i+1}, whose lean adjoint is ã_{i+1}:
    L = mean_rows ½·⟨((μ_θ − μ_ref)/σ_i + σ_i·ã_{i+1})²⟩        (= Σ_t Δt·½‖u + σã‖², ⟨·⟩ per element)
ã is solved backwards by VJPs through μ_ref along the stored path (``rsmbench.core.adjoint``).
Table 1 row: not a Table 1 row (digest §8.11: "loss ½‖u_θ + σᵀã‖², C1 ∝ σσᵀ weighting with
Ψ̂ = −ã (up to units)").
Equivalence kind: ``loss`` (identical losses for every θ, given the batch's ã):
    ½⟨(B_i(o_θ − o_ref)/σ_i + σ_iã)²⟩ = (w_i²/2)·⟨(o_θ − o_ref − σ_i²·(−ã)/B_i)²⟩
so Ψ̂/a = σ_i²·(−ã_{i+1})/B_i (the Stein / next-state form, ``estimators.stein_shift``;
score units Ψ̂ = (σ_i²/Ω_i)·(−ã_{i+1})), γ = 1, C1·a² = w_i²/2 (the KL-natural weight, β = 1),
C2 = 0, anchor s_ref (the base model). The memoryless schedule is what makes the tilted
distribution the optimum (AM Thm. 1); the loss identity holds on any affine Gaussian grid.
"""
from __future__ import annotations

import torch

from rsmbench.core import weights
from rsmbench.core.adjoint import lean_adjoint
from rsmbench.core.diffrollout import reward_and_grad
from rsmbench.core.estimators.first import stein_shift
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec


@register
class AdjointMatching(Method):
    id = "adjoint_matching"
    processes = ("flow", "diffusion")
    order = "first"
    kind = "loss"
    table_row = {"psi": '−σ²·ã/B (lean adjoint from −λ∇r, base-model chain)', "gamma": '1',
                 "c1": 'w²/2 (native) ∝ σσᵀ, anchor s_ref', "c2": '0', "branching": False,
                 "current_state": False}
    paper = "Domingo-Enrich et al. 2024, arXiv 2409.08861, §4 (lean adjoint ODE, Adjoint Matching loss)"
    table1 = "not a Table 1 row (digest §8.11)"
    kind_reason = "loss identity for all θ given the batch's lean adjoint; optimality needs a memoryless schedule"
    defaults = {"reward_scale": 1.0}
    presets = {
        "aesthetic": {"reward_scale": 5e3,
                      "source": "VGG-Flow paper (arXiv 2512.05116) §5 baseline runs of Adjoint Matching: reward "
                                "multiplier 5e3 for aesthetic (reference/anchors.md); run it on a memoryless "
                                "process (flow noise_level √2, diffusion eta 1)"},
    }

    def collect(self, ctx, cond, seeds) -> Batch:
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, dtype=_dtype(ctx))
        r, g = reward_and_grad(ctx.reward, ro.final, cond)
        return Batch(rollout=ro, rows=ro.transitions(), rewards=r, cond=cond, extras={"terminal_grad": g})

    def prepare(self, batch, ctx):
        """The lean adjoint along each stored path (no grad): data of the batch, like advantages."""
        adj = lean_adjoint(ctx.ref, batch.rollout, batch.extras["terminal_grad"], ctx.hp["reward_scale"])
        rows = batch.rows
        batch.row_data["lean_adjoint_next"] = adj[rows.sample, rows.step - int(batch.rollout.steps[0]) + 1]

    def original_loss(self, batch, ctx):
        rows, p = batch.rows, ctx.process
        out = ctx.policy(rows.x, rows.step, rows.cond)
        with torch.no_grad():
            out_base = ctx.ref(rows.x, rows.step, rows.cond)
        mu, mu_base = p.mean(rows.x, out, rows.step), p.mean(rows.x, out_base, rows.step)
        std = p.std(rows.step, like=rows.x)
        resid = (mu - mu_base) / std + std * batch.row_data["lean_adjoint_next"]
        return (0.5 * resid**2).reshape(len(rows), -1).mean(dim=1).mean()

    def rsm_spec(self, batch, ctx):
        rows = batch.rows
        psi = stein_shift(ctx.process, rows, -batch.row_data["lean_adjoint_next"])
        return RSMSpec(rows=rows, psi=psi, gamma=torch.ones(len(rows)), c1=weights.kl_natural(ctx.process, rows, 1.0),
                       c2=torch.zeros(len(rows)), anchor="ref")

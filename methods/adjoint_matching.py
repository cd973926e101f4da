"""Adjoint Matching: regress the control onto the lean adjoint along memoryless trajectories.

Paper: Domingo-Enrich, Drozdzal, Karrer, Chen 2024, "Adjoint Matching: Fine-tuning Flow and
Diffusion Generative Models with Memoryless Stochastic Optimal Control", arXiv 2409.08861, §4:
the lean adjoint ODE dã/dt = −(∇_x b(X_t, t))ᵀ·ã, ã(1) = ∇g(X_1) = −λ∇r(X_1) through the *base*
drift b, and the Adjoint Matching loss Σ_t ½‖u_θ(X_t, t) + σ(t)ᵀ·ã(t)‖² with the controlled
drift b + σ·u and the memoryless noise schedule (σ(t)² = 2η_t; diffusers-time rectified flow:
σ(t)² = 2t/(1−t), i.e. Flow-GRPO noise level √2; VP diffusion: DDPM, η = 1).
Code: microsoft/soc-fine-tuning-sd@489f904 (Microsoft's SD1.5 implementation; the AM authors' own
reference code was not found) ``src/trainers/am_trainer.py`` (``compute_adjoints`` :110-176,
``sample_time_indices`` :189-225, ``compute_loss`` :246-374), ``soc_trainer.py`` ``evaluate_controls``
:247-432, ``configs/multi_prompt.yaml``.
Discretised on the sampler grid (``rsmbench.core.process``: x' = μ + σ_i·ξ, σ_i = σ(t)·√Δt): the
control's mean shift is μ_θ − μ_base = σ(t)·u·Δt, so u·√Δt = (μ_θ − μ_ref)/σ_i (the code's
``control_times_sqrt_dt = prev_sample_diff / std_dev_t``), and per training row (sample × step k)
    ℓ_k = ½·⟨((μ_θ − μ_ref)/σ_k + σ_k·ã_k)²⟩,   L = mean_rows m_k·ℓ_k
ã is solved backwards by VJPs through μ_ref along the stored path (``rsmbench.core.adjoint``);
ã_k is the adjoint at the row's own state x_k, as the code pairs them (``adjoint_states[:, indices_t]``
with ``all_x_t[:, indices_t]``, am_trainer.py:299, soc_trainer.py:297); ``adjoint_time: next`` uses
ã_{k+1}, the adjoint of the state the step's control produces (an O(Δt) shift). Rows and clipping,
as the code (``num_timesteps_to_load_train: 4``, ``per_sample_threshold_quantile: 0.9``):
- ``train_timesteps`` n per trajectory, stratified: ⌊n/2⌋ distinct steps uniform among the first
  m = round(0.6·N), the rest among the last N − m (am_trainer.py:204-224); None trains every step;
- m_k = 1[√ℓ_k^Σ < τ]: ℓ^Σ is the per-row loss summed over elements at θ†, τ the EMA (decay 0.9,
  running mean for the first updates, am_trainer.py:178-187) of the 0.9-quantile of √ℓ^Σ over the
  batch's rows (am_trainer.py:343-362); ``clip_quantile`` < 0 disables it (m ≡ 1). The EMA lives on
  the method object and is updated once per batch, in ``prepare``.
Deviations, stated: the code draws one set of timesteps per micro-batch of ``batch_size`` (5)
trajectories and updates τ per micro-batch; here each trajectory draws its own (seeded by
``time_seed`` + the batch's first seed) and τ moves once per collected batch. The code sums over
elements without the ½; here ½⟨·⟩ (a constant scale 2/D, the suite's per-element convention). The
code evaluates m at the current θ, which in its on-policy loop is θ†: here m is fixed at θ†. The
reference config trains without CFG (``guidance_in_adjoint_computation/control: false``) and with
``prompt_dropout 0.2``; CFG is a task setting here and prompt dropout is not modelled.
Table 1 row: not a Table 1 row (derivations §8.11: "loss ½‖u_θ + σᵀã‖², C1 ∝ σσᵀ weighting with
Ψ̂ = −ã (up to units)").
Equivalence kind: ``loss`` (identical losses for every θ, given the batch's ã and m):
    ½⟨(B_k(o_θ − o_ref)/σ_k + σ_kã)²⟩ = (w_k²/2)·⟨(o_θ − o_ref − σ_k²·(−ã)/B_k)²⟩
so Ψ̂/a = σ_k²·(−ã_k)/B_k (the Stein / next-state form, ``estimators.stein_shift``; score units
Ψ̂ = (σ_k²/Ω_k)·(−ã_k)), γ = 1, C1·a² = m_k·w_k²/2 (the KL-natural weight, β = 1), C2 = 0, anchor s_ref
(the base model). The memoryless schedule is what makes the tilted distribution the optimum (AM
Thm. 1); the loss identity holds on any affine Gaussian grid.
"""
from __future__ import annotations

import torch

from rsmbench.core import weights
from rsmbench.core.adjoint import lean_adjoint
from rsmbench.core.diffrollout import reward_and_grad
from rsmbench.core.estimators.first import stein_shift
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec, elementwise_mean

EARLY_FRACTION = 0.6  # am_trainer.py:207: middle_timestep = round(num_timesteps * 0.6)


def stratified_steps(num_steps: int, n: int, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """(n_samples, n) sorted steps: ⌊n/2⌋ distinct among the first round(0.6·N), the rest distinct among
    the others (``sample_time_indices``, am_trainer.py:204-224), one draw per sample."""
    mid, first = round(num_steps * EARLY_FRACTION), n // 2
    if first > mid or n - first > num_steps - mid:
        raise ValueError(f"adjoint_matching: cannot draw {n} stratified steps of {num_steps} "
                         f"({first} of the first {mid}, {n - first} of the last {num_steps - mid})")
    draws = [torch.cat([torch.randperm(mid, generator=generator)[:first],
                        mid + torch.randperm(num_steps - mid, generator=generator)[:n - first]]).sort().values
             for _ in range(n_samples)]
    return torch.stack(draws)


class QuantileEMA:
    """The code's threshold: EMA of per-batch quantiles (``EMA_update``, am_trainer.py:29-31, 178-187)."""

    def __init__(self, decay: float = 0.9):
        self.decay, self.value, self.updates = decay, None, 0

    def update(self, value: float) -> float:
        if self.updates == 0:
            self.value = value
        elif self.updates < 1 / self.decay:
            self.value = value / (self.updates + 1) + (1 - 1 / (self.updates + 1)) * self.value
        else:
            self.value = self.decay * self.value + (1 - self.decay) * value
        self.updates += 1
        return self.value


@register
class AdjointMatching(Method):
    id = "adjoint_matching"
    processes = ("flow", "diffusion")
    # the paper fine-tunes Flow Matching text-to-image models (arXiv 2409.08861, abstract and Fig. 1: "for the
    # first time, Flow Matching models"); the SD1.5 code cited above is Microsoft's reimplementation
    published_processes = ("flow",)
    order = "first"
    kind = "loss"
    table_row = {"psi": '−σ²·ã/B (lean adjoint from −λ∇r, base-model chain)', "gamma": '1',
                 "c1": 'w²/2 (native) ∝ σσᵀ, anchor s_ref (× the loss-clip mask)', "c2": '0', "branching": False,
                 "current_state": False}
    paper = "Domingo-Enrich et al. 2024, arXiv 2409.08861, §4 (lean adjoint ODE, Adjoint Matching loss)"
    table1 = "not a Table 1 row (derivations §8.11)"
    kind_reason = ("loss identity for all θ given the batch's lean adjoint and clip mask (fixed at θ†); "
                   "optimality needs a memoryless schedule")
    defaults = {"reward_scale": hp(1.0, gt=0), "adjoint_time": hp("current", choices=("current", "next")),
                "train_timesteps": hp(4, ge=1, null=True),  # None: every step
                "clip_quantile": hp(0.9, le=1, null=True),  # < 0 or None: no loss clipping
                "ema_decay": hp(0.9, gt=0, le=1), "time_seed": hp(0, ge=0)}
    strength = "reward_scale"  # λ
    influence_preset = {"diffusion": "aesthetic", "flow": "aesthetic"}
    presets = {
        "soc_sd15": {"reward_scale": 100.0, "adjoint_time": "current", "train_timesteps": 4, "clip_quantile": 0.9,
                     "source": "microsoft/soc-fine-tuning-sd@489f904 configs/multi_prompt.yaml (reward_multiplier "
                               "100 for ImageReward, num_timesteps_to_load_train 4, "
                               "per_sample_threshold_quantile 0.9, eta 1.0), am_trainer.py EMA_decay 0.9"},
        "aesthetic": {"reward_scale": 5e3,
                      "source": "reward multiplier 5e3 for aesthetic from the VGG-Flow paper's (arXiv 2512.05116 §5) "
                                "Adjoint Matching baseline as recorded in reference/anchors.md (not re-checked "
                                "against the paper text); rows and clipping from microsoft/soc-fine-tuning-sd@489f904 "
                                "configs/multi_prompt.yaml; run it on a memoryless process (flow noise_level √2, "
                                "diffusion eta 1)"},
    }

    def threshold(self) -> QuantileEMA:
        if getattr(self, "_ema", None) is None:
            self._ema = QuantileEMA()
        return self._ema

    def state_dict(self) -> dict:
        """The loss-clip threshold's EMA (a resumed run continues it)."""
        ema = getattr(self, "_ema", None)
        return {} if ema is None or ema.value is None else {"ema": {"value": float(ema.value), "updates": ema.updates,
                                                                       "decay": float(ema.decay)}}

    def load_state_dict(self, state: dict) -> None:
        if "ema" in state:
            self._ema = QuantileEMA(state["ema"]["decay"])
            self._ema.value, self._ema.updates = state["ema"]["value"], int(state["ema"]["updates"])

    def influence_signal(self, batch, ctx, rows):
        return -batch.row_data["lean_adjoint"]  # minus the lean adjoint at the row's state (§4.1 adjoint-style)

    def collect(self, ctx, cond, seeds) -> Batch:
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, dtype=_dtype(ctx))
        r, g = reward_and_grad(ctx.reward, ro.final, cond)
        rows = ro.transitions()
        n = ctx.hp.get("train_timesteps")
        if n is not None:
            gen = torch.Generator().manual_seed(int(ctx.hp["time_seed"]) + int(seeds[0]))
            rows = weights.select_train_rows(rows, stratified_steps(ctx.process.num_steps, int(n), len(seeds), gen))
        return Batch(rollout=ro, rows=rows, rewards=r, cond=cond, extras={"terminal_grad": g})

    def prepare(self, batch, ctx):
        """The lean adjoint along each stored path and the loss-clip mask at θ† (no grad): data of the
        batch, like advantages."""
        hp, rows, p = ctx.hp, batch.rows, ctx.process
        if hp["adjoint_time"] not in ("current", "next"):
            raise ValueError(f"adjoint_matching: adjoint_time must be 'current' or 'next', got {hp['adjoint_time']!r}")
        adj = lean_adjoint(ctx.ref, batch.rollout, batch.extras["terminal_grad"], hp["reward_scale"])
        pos = rows.step - int(batch.rollout.steps[0]) + (1 if hp["adjoint_time"] == "next" else 0)
        a = adj[rows.sample, pos]
        batch.row_data["lean_adjoint"] = a
        keep = torch.ones(len(rows), dtype=rows.x.dtype)
        if hp["clip_quantile"] is not None and hp["clip_quantile"] >= 0:
            with torch.no_grad():
                mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step)
                std = p.std(rows.step, like=rows.x)
                resid = (rows.mean - mu_ref) / std + std * a
                root = (resid**2).reshape(len(rows), -1).sum(dim=1).sqrt()  # √(the code's loss_evals)
            ema = self.threshold()
            ema.decay = float(hp["ema_decay"])
            tau = ema.update(torch.quantile(root, float(hp["clip_quantile"])).item())
            keep = (root < tau).to(rows.x.dtype)
            batch.extras.setdefault("stats", {}).update(am_clip_threshold=tau, am_kept=keep.mean().item())
        batch.row_data["keep"] = keep

    def original_loss(self, batch, ctx):
        rows, p = batch.rows, ctx.process
        out = ctx.policy(rows.x, rows.step, rows.cond)
        with torch.no_grad():
            out_base = ctx.ref(rows.x, rows.step, rows.cond)
        mu, mu_base = p.mean(rows.x, out, rows.step), p.mean(rows.x, out_base, rows.step)
        std = p.std(rows.step, like=rows.x)
        resid = (mu - mu_base) / std + std * batch.row_data["lean_adjoint"]
        return (batch.row_data["keep"] * 0.5 * elementwise_mean(resid**2)).mean()

    def rsm_spec(self, batch, ctx):
        rows = batch.rows
        psi = stein_shift(ctx.process, rows, -batch.row_data["lean_adjoint"])
        c1 = weights.kl_natural(ctx.process, rows, 1.0) * batch.row_data["keep"]
        return RSMSpec(rows=rows, psi=psi, gamma=torch.ones(len(rows)), c1=c1, c2=torch.zeros(len(rows)),
                       anchor="ref")

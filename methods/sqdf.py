"""SQDF: reparameterised policy gradient of a training-free soft-Q estimate.

Paper: Kang, Lee, Shin, Om, Park, "Diffusion Fine-Tuning via Reparameterized Policy Gradient of the
Soft Q-Function" (ICLR 2026, arXiv 2512.04559). Code: Shin-woocheol/SQDF@68861b2 ``T2I`` (loss
``alignprop_trainer.py:544-550``, KL ``sd_pipeline.py:563-566``, discount ``sd_pipeline.py:790-793``,
replay buffer ``alignprop_trainer.py:777-973``).
Table 1 row: "SQDF" (no ‡: the estimate is taken at the next state x_{t−1}; derivations §8.2).

Original (per row = sample × stochastic DDPM step i: x_t → x_{t'}; mean over rows):
    x_{t'}(θ) = μ_θ(x_t) + σ_t·ξ                 (reparameterised)
    r         = r(x̂_0(Φ_k(x_{t'}(θ)))),  Q = γ_d^(N−1−i)·r   (soft-Q estimate, k-step lookahead)
    L         = 1[r > 0]·(−Q + α·KL_t),   KL_t = ⟨(μ_ref − μ_θ)²⟩/σ_t²   (per-element mean, no ½)
This is the code's loss: ``KL_loss_term = (1/σ̄²)·mean((μ_ref − μ_θ)²)`` (sd_pipeline.py:563-566, so
α multiplies twice the Gaussian KL ⟨Δμ²⟩/(2σ²)), and ``mask = (rewards > 0)`` multiplies the whole
per-sample loss before the batch mean (alignprop_trainer.py:545-549): ``reward_mask``, on in both
presets. It is off in the class defaults, on purpose: on SQDF's rewards (aesthetic, HPS: positive) it
never binds, but on a reward that is ≤ 0 everywhere (the harness's toy reward, JPEG size) it would
silently switch training off.
Φ_k = k deterministic DDIM (η = 0) steps of the frozen reference, then Tweedie; the gradient flows
through the lookahead into x_{t'}(θ). The discount exponent is the number of steps left after the
transition (``timestep_gamma = num_inference_steps - timestep_index - 1``).

Replay buffer (``use_buffer``, the aesthetic run's ``--use_buffer=True --buffer_size=1024
--replay_ratio=1``, T2I/aesthetic.sh; ``buffer_method`` 'random', config/alignprop_config.py:156-159):
every iteration the fresh behaviour trajectories are stored (a ring of ``buffer_size`` trajectories,
the oldest overwritten: ``traj_idx = num_stored % buf_size``, alignprop_trainer.py:880-906), then as
many trajectories as were sampled are drawn uniformly without replacement from the buffer
(``random.sample``, :947) and trained on, at their stored states x_t with fresh noise ξ
(sd_pipeline.py:1011-1060). The buffer lives on the method object (``state_dict`` /
``load_state_dict`` hold it); replay_ratio > 1 (several draws per sampling phase) is not offered,
since the training loop reuses one collected batch for its ``inner_updates``.

Deliberate deviations, stated:
- Trained steps: SQDF trains one uniform random step per trajectory (``timestep_index =
  torch.randint(0, num_inference_steps, (batch_size,))``, sd_pipeline.py:790, :1011); by default every
  step is a row here (the same expectation, lower variance). ``steps_per_trajectory: 1`` is theirs.
- Lookahead: SQDF uses a distilled consistency model (LCM-LoRA) for x̂_0, or, without it, one
  reference Tweedie at x_{t'} (sd_pipeline.py:845-908). No consistency model of the toy networks
  exists here, so Φ_k is the RSM toy's "SQDF-k" (k = 2: 2-step deterministic DDIM + Tweedie,
  derivations §4.1; k = 0 is their no-CM branch), with k as a hyperparameter.

RSM instance (derivations §8.2): at θ = θ†, with m = 1[r > 0],
∇L = m·(−γ_d·D·B·⟨g·∂ε_θ⟩ + 2α·w²·⟨(ε_θ − ε_ref)·∂ε_θ⟩), g = ∇_{x'} r(x̂_0(Φ_k(x'))) (r is a
scalar: Σ over elements = D·⟨·⟩, the factor-D scale note), i.e.
    Ψ̂ = D·(σ²/Ω)·g/(2α)  (native Ψ̂/a = D·σ²·g/(2α·B), ``stein_shift``),  γ = γ_d^(N−1−i),
    C1 = m·α·Ω²/σ² (native m·α·w², ``kl_natural`` with β = 2α),  C2 = 0,  anchor s_ref.
g and m are evaluated at the behaviour's reparameterised next state x'_† = μ_θ†(x_t) + σ_t·ξ.

Equivalence kind: ``grad_at_behaviour``: exact at θ = θ† (x_{t'}(θ†) = x'_†, so Ψ̂ is the
original's pathwise gradient; m is piecewise constant); off θ† the original re-evaluates g at
x_{t'}(θ) and its −Q term is not quadratic, so the two differ (the harness's off-policy series).
Replayed rows change which states are trained on, not this identity.
"""
from __future__ import annotations

import torch

from rsmbench.core import weights
from rsmbench.core.estimators import first as fo
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rollout import Transitions, generators, sample
from rsmbench.core.rsm import RSMSpec, elementwise_mean


def _el(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@register
class SQDF(Method):
    id = "sqdf"
    processes = ("diffusion",)
    published_processes = ("diffusion",)  # SD1.5 (arXiv 2512.04559; Shin-woocheol/SQDF T2I/aesthetic.sh)
    order = "first"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ²/Ω)·(D/(2α))·∇r(x̂₀(Φ_k(x_{t−1}))), k-step lookahead', "gamma": 'γ_d^(N−1−i)',
                 "c1": '1[r>0]·α·Ω²/σ² (the code\'s KL has no ½)', "c2": '0', "branching": False,
                 "current_state": False}
    paper = "SQDF: Kang et al. 2026, arXiv 2512.04559 (reparameterised soft-Q policy gradient); derivations §8.2"
    table1 = "SQDF"
    kind_reason = ("θ = θ†, on the row's ξ: the reparameterised next state equals the behaviour's, the "
                   "reward mask is piecewise constant, and the per-element-mean KL makes Ψ̂ carry the factor D")
    defaults = {"alpha": hp(0.01, gt=0), "gamma_d": hp(0.9, gt=0, le=1), "lookahead_steps": hp(2, ge=0),
                "reward_mask": False, "use_buffer": False, "buffer_size": hp(1024, ge=1),
                "replay_ratio": hp(1, choices=(1,)),  # only 1 is offered (one buffer draw per collected batch)
                "buffer_seed": hp(0, ge=0), "steps_per_trajectory": hp(None, type=int, ge=1)}
    strength = "alpha"  # the KL weight α
    influence_preset = {"diffusion": "sqdf_t2i"}
    presets = {
        "sqdf_t2i": {"alpha": 0.01, "gamma_d": 0.9, "lookahead_steps": 2, "reward_mask": True, "use_buffer": False,
                     "source": "Shin-woocheol/SQDF@68861b2 T2I/config/alignprop_config.py:129-130,156 (sqdf_gamma "
                               "0.9, sqdf_alpha 0.01, use_buffer False), loss alignprop_trainer.py:544-549; "
                               "lookahead k = 2 replaces the consistency model (RSM toy SQDF-2)"},
        "sqdf_aesthetic": {"alpha": 2.0, "gamma_d": 0.9, "lookahead_steps": 2, "reward_mask": True,
                           "use_buffer": True, "buffer_size": 1024, "replay_ratio": 1,
                           "source": "Shin-woocheol/SQDF@68861b2 T2I/aesthetic.sh ('sqdf cm,buffer': "
                                     "--sqdf_gamma=0.90 --sqdf_alpha=2.0 --use_buffer=True --buffer_size=1024 "
                                     "--replay_ratio=1; buffer_method 'random', config/alignprop_config.py:159)"},
    }

    # -- rows: on-policy, or replayed from the buffer --------------------------------------------------
    def collect(self, ctx, cond, seeds) -> Batch:
        hp, p = ctx.hp, ctx.process
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, dtype=_dtype(ctx))
        batch = Batch(rollout=ro, rows=ro.transitions(), rewards=ctx.reward(ro.final, cond), cond=cond)
        gen = torch.Generator().manual_seed(int(hp["buffer_seed"]) + int(seeds[0]))
        B, N = len(seeds), p.num_steps
        n_steps = hp.get("steps_per_trajectory")
        steps = (torch.arange(N).expand(B, N) if n_steps is None
                 else torch.randint(0, N, (B, int(n_steps)), generator=gen))
        if hp["use_buffer"]:
            if int(hp["replay_ratio"]) != 1:
                raise ValueError("sqdf: only replay_ratio 1 is offered (one buffer draw per collected batch)")
            self._store(ro, int(hp["buffer_size"]))
            picked = torch.randperm(self._stored, generator=gen)[:B]
            batch.rows = self._replay_rows(ctx, picked, steps, gen)
            batch.extras["buffer"] = {"stored": self._stored, "picked": picked}
        elif n_steps is not None:
            batch.rows = weights.select_train_rows(batch.rows, steps)
        return batch

    def _store(self, ro, capacity: int) -> None:
        """Append the rollout's states x_0 … x_{N−1} (and conditions) to the ring buffer."""
        B = ro.batch_size
        if capacity < B:
            raise ValueError(f"sqdf: buffer_size {capacity} holds fewer trajectories than a batch ({B})")
        if getattr(self, "_buf", None) is None or self._buf.shape[0] != capacity:
            self._buf = torch.zeros((capacity,) + tuple(ro.states[:, :-1].shape[1:]), dtype=ro.states.dtype)
            self._buf_cond = None if ro.cond is None else torch.zeros(capacity, dtype=ro.cond.dtype)
            self._written, self._stored = 0, 0
        slots = (self._written + torch.arange(B)) % capacity
        self._buf[slots] = ro.states[:, :-1].detach().cpu()
        if self._buf_cond is not None:
            self._buf_cond[slots] = ro.cond.cpu()
        self._written += B
        self._stored = min(self._written, capacity)

    def state_dict(self) -> dict:
        """The replay buffer (for a resumable run): states, conditions and write counter."""
        if getattr(self, "_buf", None) is None:
            return {}
        return {"states": self._buf[:self._stored].clone(), "written": self._written,
                "capacity": self._buf.shape[0], "cond": None if self._buf_cond is None else self._buf_cond.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self._buf = None
            return
        n = state["states"].shape[0]
        self._buf = torch.zeros((state["capacity"],) + tuple(state["states"].shape[1:]), dtype=state["states"].dtype)
        self._buf[:n] = state["states"]
        self._buf_cond = None
        if state["cond"] is not None:
            self._buf_cond = torch.zeros(state["capacity"], dtype=state["cond"].dtype)
            self._buf_cond[:n] = state["cond"][:n]
        self._written, self._stored = int(state["written"]), n

    @torch.no_grad()
    def _replay_rows(self, ctx, picked, steps, gen) -> Transitions:
        """Rows at the stored states of the picked trajectories, steps (B, n) each, fresh ξ, with the
        current θ†'s mean, output and log-prob (sample-major; row sample = position in `picked`)."""
        p, dt = ctx.process, _dtype(ctx)
        dev = next(ctx.policy.net.parameters()).device
        B, n = steps.shape
        sample_id = torch.arange(B).repeat_interleave(n)
        step = steps.reshape(-1)
        x = self._buf[picked[sample_id], step].to(device=dev, dtype=dt)
        cond = None if self._buf_cond is None else self._buf_cond[picked[sample_id]].to(dev)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=dev, dtype=dt)
        out = ctx.behaviour(x, step, cond)
        mean = p.mean(x, out, step)
        x_next = mean + p.std(step, like=x) * noise
        return Transitions(x=x, x_next=x_next, noise=noise, mean=mean, out_behaviour=out,
                           log_prob=p.log_prob(x_next, mean, step), step=step,
                           stochastic=torch.ones(len(step), dtype=torch.bool), sample=sample_id, cond=cond)

    # -- the original ----------------------------------------------------------------------------
    def _lookahead_x0(self, ctx, z, step, cond):
        """Φ_k then Tweedie with the frozen reference, differentiable in z (x̂_0 = z at the end)."""
        p, N, k = ctx.process, ctx.process.num_steps, ctx.hp["lookahead_steps"]
        for j in range(k):
            s = step + j
            si = s.clamp(max=N - 1)
            tab = p.ode  # DDIM η = 0
            z_next = _el(tab.A[si].to(z.dtype), z) * z + _el(tab.B[si].to(z.dtype), z) * ctx.ref(z, si, cond)
            z = torch.where(_el(s < N, z), z_next, z)
        s = step + k
        si = s.clamp(max=N - 1)
        ab = _el(p.alphas_cumprod_t[si].to(z.dtype), z)
        x0 = (z - (1 - ab).sqrt() * ctx.ref(z, si, cond)) / ab.sqrt()
        return torch.where(_el(s >= N, z), z, x0)

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        x, i, cond = rows.x, rows.step, rows.cond
        eps = ctx.policy(x, i, cond)
        mu = p.mean(x, eps, i)
        std = p.std(i, like=x)
        x_next = mu + std * rows.noise  # reparameterised
        discount = hp["gamma_d"] ** (p.num_steps - 1 - i).to(x.dtype)
        r = ctx.reward(self._lookahead_x0(ctx, x_next, i + 1, cond), cond)
        with torch.no_grad():
            mu_ref = p.mean(x, ctx.ref(x, i, cond), i)
        kl = elementwise_mean((mu_ref - mu) ** 2) / std.reshape(-1) ** 2  # SQDF's KL_loss_term (no ½)
        loss = -discount * r + hp["alpha"] * kl
        if hp["reward_mask"]:
            loss = loss * (r.detach() > 0).to(loss.dtype)
        return loss.mean()

    # -- the RSM instance --------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        with torch.no_grad():
            x_b, _ = p.step(rows.x, ctx.behaviour(rows.x, rows.step, rows.cond), rows.step, rows.noise)
        G, r = fo.lookahead(ctx.ref, ctx.reward, x_b, rows.step + 1, rows.cond, k=hp["lookahead_steps"],
                            return_value=True)
        D = rows.x[0].numel()
        R = len(rows)
        c1 = weights.kl_natural(p, rows, 2 * hp["alpha"])
        if hp["reward_mask"]:
            c1 = c1 * (r > 0).to(c1.dtype)
        return RSMSpec(rows=rows, psi=fo.stein_shift(p, rows, G, D / (2 * hp["alpha"])),
                       gamma=weights.discount(p, rows, hp["gamma_d"]), c1=c1,
                       c2=torch.zeros(R, dtype=rows.x.dtype), anchor="ref")

    def influence_signal(self, batch, ctx, rows):
        """k-step lookahead of the reference from the next state (derivations §8.2); x' = μ_θ† + σξ = rows.x_next."""
        return fo.lookahead(ctx.ref, ctx.reward, rows.x_next, rows.step + 1, rows.cond, k=ctx.hp["lookahead_steps"])

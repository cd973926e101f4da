"""SQDF: reparameterised policy gradient of a training-free soft-Q estimate.

Paper: Kang, Lee, Shin, Om, Park, "Diffusion Fine-Tuning via Reparameterized Policy Gradient of the
Soft Q-Function" (ICLR 2026, arXiv 2512.04559). Code: Shin-woocheol/SQDF (``T2I``: loss
−(γ_d^τ·r − α·KL) with ``sqdf_gamma`` 0.9, ``sqdf_alpha``, consistency-model lookahead, replay buffer).
Table 1 row: "SQDF" (no ‡: the estimate is taken at the next state x_{t−1}; digest §8.2).

Original (per row = sample × stochastic DDPM step i: x_t → x_{t'}; mean over rows):
    x_{t'}(θ) = μ_θ(x_t) + σ_t·ξ                 (reparameterised with the rollout's own ξ)
    Q         = γ_d^(N−1−i) · r(x̂_0(Φ_k(x_{t'}(θ))))  (soft-Q estimate, k-step lookahead)
    L         = −Q + α·KL_t(p_θ ‖ p_ref),   KL_t = ⟨(μ_θ − μ_ref)²⟩/(2σ_t²)   (per-element mean)
Φ_k = k deterministic DDIM (η = 0) steps of the frozen reference, then Tweedie; the gradient flows
through the lookahead into x_{t'}(θ). SQDF uses a distilled consistency model for x̂_0; no
consistency model of the toy networks exists here, so the lookahead is the RSM toy's "SQDF-k"
(k = 2: 2-step deterministic DDIM + Tweedie, digest §4.1), with k as a hyperparameter. The discount
exponent is the number of steps left after the transition [I: the code's ``time_tensor``].
The replay buffer only changes which states x_t are trained on; it is not implemented here.

RSM instance (digest §8.2): at θ = θ†, ∇L = −γ_d·D·B·⟨g·∂ε_θ⟩ + α·w²·⟨(ε_θ − ε_ref)·∂ε_θ⟩ with
g = ∇_{x'} r(x̂_0(Φ_k(x'))) (r is a scalar: Σ over elements = D·⟨·⟩, the factor-D scale note), i.e.
    Ψ̂ = D·(σ²/Ω)·(1/α)·g  (native Ψ̂/a = D·σ²·g/(α·B), ``stein_shift``),  γ = γ_d^(N−1−i),
    C1 = α·Ω²/(2σ²) (native α·w²/2, ``kl_natural``),  C2 = 0,  anchor s_ref.
g is evaluated at the behaviour's reparameterised next state x'_† = μ_θ†(x_t) + σ_t·ξ.

Equivalence kind: ``grad_at_behaviour``: exact at θ = θ† (x_{t'}(θ†) = x'_†, so Ψ̂ is the
original's pathwise gradient); off θ† the original re-evaluates g at x_{t'}(θ) and its −Q term is
not quadratic, so the two differ (the harness's off-policy series measures it).
"""
from __future__ import annotations

import torch

from rsmbench.core import weights
from rsmbench.core.estimators import first as fo
from rsmbench.core.method import Method, register
from rsmbench.core.rsm import RSMSpec


def _el(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@register
class SQDF(Method):
    id = "sqdf"
    processes = ("diffusion",)
    order = "first"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ²/Ω)·(D/α)·∇r(x̂₀(Φ_k(x_{t−1}))), k-step lookahead', "gamma": 'γ_d^(N−1−i)',
                 "c1": 'α·Ω²/(2σ²)', "c2": '0', "branching": False, "current_state": False}
    paper = "SQDF: Kang et al. 2026, arXiv 2512.04559 (reparameterised soft-Q policy gradient); RSM digest §8.2"
    table1 = "SQDF"
    kind_reason = ("θ = θ†, on the rollout's own ξ: the reparameterised next state equals the behaviour's, "
                   "and the per-element-mean KL makes Ψ̂ carry the factor D")
    defaults = {"alpha": 0.01, "gamma_d": 0.9, "lookahead_steps": 2}
    presets = {
        "sqdf_t2i": {"alpha": 0.01, "gamma_d": 0.9, "lookahead_steps": 2,
                     "source": "Shin-woocheol/SQDF T2I/config/alignprop_config.py (sqdf_gamma 0.9, sqdf_alpha 0.01); "
                               "lookahead k = 2 replaces the consistency model (RSM toy SQDF-2)"},
        "sqdf_aesthetic": {"alpha": 2.0, "gamma_d": 0.9, "lookahead_steps": 2,
                           "source": "Shin-woocheol/SQDF T2I/aesthetic.sh (--sqdf_gamma=0.90 --sqdf_alpha=2.0)"},
    }

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
        x_next = mu + p.std(i, like=x) * rows.noise  # reparameterised
        discount = hp["gamma_d"] ** (p.num_steps - 1 - i).to(x.dtype)
        q = discount * ctx.reward(self._lookahead_x0(ctx, x_next, i + 1, cond), cond)
        with torch.no_grad():
            mu_ref = p.mean(x, ctx.ref(x, i, cond), i)
        return (-q + hp["alpha"] * p.kl(mu, mu_ref, i)).mean()

    # -- the RSM instance --------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        with torch.no_grad():
            x_b, _ = p.step(rows.x, ctx.behaviour(rows.x, rows.step, rows.cond), rows.step, rows.noise)
        G = fo.lookahead(ctx.ref, ctx.reward, x_b, rows.step + 1, rows.cond, k=hp["lookahead_steps"])
        D = rows.x[0].numel()
        R = len(rows)
        return RSMSpec(rows=rows, psi=fo.stein_shift(p, rows, G, D / hp["alpha"]),
                       gamma=weights.discount(p, rows, hp["gamma_d"]),
                       c1=weights.kl_natural(p, rows, hp["alpha"]),
                       c2=torch.zeros(R, dtype=rows.x.dtype), anchor="ref")

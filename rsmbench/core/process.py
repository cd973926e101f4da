"""The two sampling processes, written once as affine Gaussian steps.

Every sampler step of both processes has the form (per sample, element-wise)

    x_{t'} = μ + σ·ξ,     μ = A_i·x_t + B_i·o_θ(x_t, t_i),     ξ ~ N(0, I)

where o is the network's native output (ε for VP diffusion, v for rectified flow), and the
score is affine in the same output:

    s(x_t) = a_i·o + b_i·x_t.

So μ_θ − μ_ref = B_i·(o_θ − o_ref) = Ω_i·(s_θ − s_ref) with Ω_i = B_i / a_i (derivations §2.2–2.3),
and the per-step weight is w_i = −B_i / σ_i (the "DDPM weight" (c1−c2)/σ_t, resp. Flow-GRPO's
c_t·√Δt/σ̃_t). All coefficient tables are computed in float64 from diffusers' schedulers.

Diffusion (DDIM, Song et al. 2021, arXiv 2010.02502, Eq. 12; SD1.5 grid conventions):
    α_t = ᾱ_t/ᾱ_t',  σ_t = η·√((1−ᾱ_t')/(1−ᾱ_t))·√(1−α_t),
    c1 = √(1−ᾱ_t)/√α_t,  c2 = √(1−ᾱ_t'−σ_t²),
    μ = x/√α_t − (c1−c2)·ε,  s = −ε/√(1−ᾱ_t),  x̂0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t.
    t' = t − T/N is clamped at 0 (ᾱ_{t'} = ᾱ_0, diffusers' ``set_alpha_to_one=False``), so the
    final step never has σ = 0 when η > 0. η = 1 is DDPM's posterior (Ho et al. 2020, Eq. 7).

Rectified flow (diffusers convention x_t = (1−t)·x0 + t·ε, v = ε − x0; t ≡ σ ∈ [0, 1]):
    s = −(x + (1−t)·v)/t,  x̂0 = x − t·v.
    SDE step (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, Eq. 9), noise level a:
        σ̃ = a·√(t/(1−t)) (at t = 1 the denominator uses the grid's second σ),
        μ = x − Δt·[v + σ̃²/(2t)·(x + (1−t)·v)],  σ_step = σ̃·√Δt.
    ODE step (Euler): x_{t−Δt} = x − Δt·v.

Per-step Gaussian quantities use the per-element mean ⟨·⟩ over the sample's elements, the
convention of DDPO and Flow-GRPO: log p = ⟨−(x'−μ)²/(2σ²)⟩ − log σ − ½·log 2π and
KL(p_a‖p_b) = ⟨(μ_a − μ_b)²⟩/(2σ²).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

KINDS = ("diffusion", "flow")
PREDICTION = {"diffusion": "epsilon", "flow": "v"}


@dataclass(frozen=True)
class StepTable:
    """Per-step coefficients of μ = A·x + B·o and σ, for one choice of stochasticity."""

    A: torch.Tensor  # (N,)
    B: torch.Tensor  # (N,)
    std: torch.Tensor  # (N,), 0 for deterministic steps


class Process:
    """A sampler grid with its stochastic and deterministic step tables (float64).

    Subclasses fill ``timesteps`` (the model's time input per step), the score map (a, b), the
    Tweedie map, and the two step tables. Everything else is shared.
    """

    kind: str
    prediction: str

    def __init__(self, num_steps: int):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.model_t: torch.Tensor  # (N,) time input of the network at step i
        self.score_a: torch.Tensor  # (N,)
        self.score_b: torch.Tensor  # (N,)
        self.sde: StepTable
        self.ode: StepTable

    # ---- coefficient access ----------------------------------------------------------
    def table(self, stochastic: bool) -> StepTable:
        return self.sde if stochastic else self.ode

    def omega(self, i=None, stochastic: bool = True) -> torch.Tensor:
        """Ω_i = B_i/a_i: μ_θ − μ_ref = Ω_i·(s_θ − s_ref). Infinite where a_i = 0 (flow t = 1)."""
        B = self.table(stochastic).B
        om = B / self.score_a
        return om if i is None else om[i]

    def weight(self, i=None) -> torch.Tensor:
        """w_i = −B_i/σ_i of the stochastic step: KL_i = (w_i²/2)·⟨(o_θ − o_ref)²⟩."""
        w = -self.sde.B / self.sde.std
        return w if i is None else w[i]

    def _c(self, coeff: torch.Tensor, i, like: torch.Tensor) -> torch.Tensor:
        """Coefficient(s) at step index i (int or (B,) long), shaped to broadcast against `like`."""
        c = coeff[i] if isinstance(i, int) else coeff[i.to(coeff.device)]
        c = c.to(dtype=like.dtype, device=like.device)
        return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))

    # ---- the step ----------------------------------------------------------------------
    def check_output(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if out.shape != x.shape:
            raise ValueError(
                f"model output shape {tuple(out.shape)} does not match state shape {tuple(x.shape)}"
            )

    def mean(self, x, out, i, stochastic: bool = True) -> torch.Tensor:
        self.check_output(x, out)
        tab = self.table(stochastic)
        return self._c(tab.A, i, x) * x + self._c(tab.B, i, x) * out

    def std(self, i, stochastic: bool = True, like: torch.Tensor | None = None) -> torch.Tensor:
        s = self.table(stochastic).std
        return s[i] if like is None else self._c(s, i, like)

    def step(self, x, out, i, noise=None, stochastic: bool = True):
        """One sampler step. Returns (x_next, mean). `noise` is ξ; ignored if the step is deterministic."""
        mu = self.mean(x, out, i, stochastic)
        if not stochastic or noise is None:
            return mu, mu
        return mu + self.std(i, stochastic, like=x) * noise, mu

    # ---- conversions --------------------------------------------------------------------
    def to_score(self, x, out, i) -> torch.Tensor:
        self.check_output(x, out)
        return self._c(self.score_a, i, x) * out + self._c(self.score_b, i, x) * x

    def from_score(self, x, score, i) -> torch.Tensor:
        return (score - self._c(self.score_b, i, x) * x) / self._c(self.score_a, i, x)

    def tweedie(self, x, out, i) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- per-step Gaussian log-prob and KL ---------------------------------------------------
    def log_prob(self, x_next, mean, i, stochastic: bool = True) -> torch.Tensor:
        """Per-sample ⟨log N(x_next; mean, σ_i²)⟩ (mean over elements)."""
        std = self.std(i, stochastic, like=x_next)
        if torch.any(std <= 0):
            raise ValueError("log_prob of a deterministic step (σ = 0) is undefined")
        dims = tuple(range(1, x_next.dim()))
        lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return lp.mean(dim=dims)

    def kl(self, mean_a, mean_b, i) -> torch.Tensor:
        """Per-sample KL(N(mean_a, σ_i²) ‖ N(mean_b, σ_i²)) per element: ⟨(μ_a−μ_b)²⟩/(2σ_i²)."""
        std = self.std(i, True, like=mean_a)
        dims = tuple(range(1, mean_a.dim()))
        return (((mean_a - mean_b) ** 2) / (2 * std**2)).mean(dim=dims)


class DiffusionProcess(Process):
    """VP diffusion, ε-prediction, DDIM-η steps on diffusers' DDIM grid (η = 1: DDPM)."""

    kind = "diffusion"
    prediction = "epsilon"

    def __init__(self, num_steps: int = 50, eta: float = 1.0, scheduler: dict | None = None):
        super().__init__(num_steps)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = eta
        cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                   beta_start=0.00085, beta_end=0.012)  # SD1.5 defaults
        cfg.update(scheduler or {})
        for key in ("set_alpha_to_one", "clip_sample"):  # the grid below assumes both off: never force them
            if cfg.get(key):
                raise ValueError(f"scheduler.{key}: true is not supported (the last step clamps t' at 0, "
                                 "ᾱ_{t'} = ᾱ_0, so that it keeps σ > 0; x̂₀ is never clipped)")
        cfg.update(steps_offset=cfg.get("steps_offset", 1), set_alpha_to_one=False, clip_sample=False)
        self.scheduler = DDIMScheduler(**cfg)
        self.scheduler.set_timesteps(num_steps)
        T = self.scheduler.config.num_train_timesteps
        t = self.scheduler.timesteps.long()
        t_prev = (t - T // num_steps).clamp(min=0)
        acp = self.scheduler.alphas_cumprod.double()
        ab, ab_prev = acp[t], acp[t_prev]
        self.timesteps, self.prev_timesteps = t, t_prev
        self.alphas_cumprod_t, self.alphas_cumprod_prev = ab, ab_prev
        self.model_t = t.double()
        self.score_a = -1.0 / torch.sqrt(1 - ab)
        self.score_b = torch.zeros_like(ab)
        self.sde = self._table(eta)
        self.ode = self._table(0.0)

    def _table(self, eta: float) -> StepTable:
        ab, ab_prev = self.alphas_cumprod_t, self.alphas_cumprod_prev
        alpha = ab / ab_prev
        std = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - alpha)
        c1 = torch.sqrt(1 - ab) / torch.sqrt(alpha)
        c2 = torch.sqrt((1 - ab_prev - std**2).clamp(min=0))
        return StepTable(A=1 / torch.sqrt(alpha), B=-(c1 - c2), std=std)

    def tweedie(self, x, out, i):
        ab = self._c(self.alphas_cumprod_t, i, x)
        return (x - torch.sqrt(1 - ab) * out) / torch.sqrt(ab)


class FlowProcess(Process):
    """Rectified flow, v-prediction, on diffusers' (shifted) FlowMatchEuler σ grid."""

    kind = "flow"
    prediction = "v"

    def __init__(self, num_steps: int = 10, noise_level: float = 0.7, shift: float = 3.0):
        super().__init__(num_steps)
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        self.noise_level = noise_level
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        self.scheduler.set_timesteps(num_steps)
        sig = self.scheduler.sigmas.double()  # (N+1,), trailing 0
        self.sigmas = sig
        t, t_next = sig[:-1], sig[1:]
        dt = t - t_next
        self.t, self.dt = t, dt
        self.model_t = self.scheduler.timesteps.double()  # σ·T, as SD3's transformer expects
        self.score_a = -(1 - t) / t
        self.score_b = -1 / t
        # σ̃_t = a·√(t/(1−t)); at t = 1 the denominator uses sigmas[1] (Flow-GRPO's edge rule).
        t_den = torch.where(t >= 1.0, sig[1] if num_steps > 1 else torch.zeros(()), t)
        self.sigma_tilde = noise_level * torch.sqrt(t / (1 - t_den))
        st2 = self.sigma_tilde**2
        self.sde = StepTable(A=1 - dt * st2 / (2 * t), B=-dt * (1 + st2 * (1 - t) / (2 * t)),
                             std=self.sigma_tilde * torch.sqrt(dt))
        self.ode = StepTable(A=torch.ones_like(t), B=-dt, std=torch.zeros_like(t))

    def tweedie(self, x, out, i):
        return x - self._c(self.t, i, x) * out


def make_process(kind: str, **kw) -> Process:
    """Build a process by name: 'diffusion' (kw: num_steps, eta, scheduler) or 'flow'
    (kw: num_steps, noise_level, shift)."""
    if kind == "diffusion":
        return DiffusionProcess(**kw)
    if kind == "flow":
        return FlowProcess(**kw)
    raise ValueError(f"unknown process {kind!r}; choose one of {', '.join(KINDS)}")

"""Temporal weights C1(t), γ(t) and trust-region weights C2(t) (derivations §5–§7), native units.

KL-natural weight (REINFORCE+KL, derivations §8.4): the per-step Gaussian KL is
KL_t = ⟨(μ_θ−μ_ref)²⟩/(2σ²) = (Ω²/2σ²)·⟨(s_θ−s_ref)²⟩ = (w²/2)·⟨(o_θ−o_ref)²⟩, so β·KL_t is the
C1 term with C1 = β·Ω²/(2σ²) in score units, β·w²/2 in native units.
"""
from __future__ import annotations

import torch


def kl_natural(process, rows, beta: float = 1.0) -> torch.Tensor:
    """C1·a² = β·w_t²/2 per row."""
    return beta * process.weight(rows.step).to(rows.x.dtype) ** 2 / 2


# ---- PPO family (KL-free, anchor s_θ†): the per-step credit κ_t and γ = κ_t/w_t ----------------
# A KL-free surrogate whose first-step gradient is A·κ_t·⟨ξ·∂o_θ⟩ (o native) is the RSM instance
# with the likelihood-ratio Ψ̂ (β = 1), C1·a² = w_t²/2 (``kl_natural``, β = 1) and γ = κ_t/w_t:
# −2·C1·γ·Ψ̂ = w_t²·(κ_t/w_t)·A·ξ/w_t = κ_t·A·ξ (derivations §7.2, caveat: only C1·γ·Ψ̂ is fixed).

def relative_gamma(process, rows, kappa) -> torch.Tensor:
    """γ = κ_t / w_t per row; κ is a scalar or (R,)."""
    w = process.weight(rows.step).to(rows.x.dtype)
    return torch.as_tensor(kappa, dtype=rows.x.dtype) / w


def kappa_step_size(process, rows, zeta: float) -> torch.Tensor:
    """κ = ζ·Δt_i (PCPO-reweight flow, derivations §8.7): credit proportional to the step size."""
    return zeta * process.dt[rows.step].to(rows.x.dtype)


def kappa_guard(process, rows) -> torch.Tensor:
    """κ = c_t = −B_t/Δt_i (GRPO-Guard, derivations §8.10): σ_s·w_t/Δt, constant 1 + a²/2 for t < 1."""
    return (-process.sde.B / process.dt)[rows.step].to(rows.x.dtype)


# ---- reward-backprop family (DRaFT, AlignProp, ReFL): C1 that turns E_rows ⟨·⟩ into Σ_steps ------
# The RSM gradient of one row at θ† is −2·C1a²·γ·⟨(Ψ̂/a)·∂o_θ⟩ = −(2·C1a²/D)·γ·(Ψ̂/a)ᵀ∂o_θ (per-element
# mean over D elements), averaged over the m rows of a sample; a pathwise original sums (DRaFT-K,
# AlignProp: m = K steps) or averages (DRaFT-LV draws, ReFL: 1 step) its per-step terms
# (Ψ̂/a)ᵀ∂o_θ. So C1·a² = D·m/2 (summed) or D/2 (averaged): the D is the ⟨·⟩-vs-scalar-reward
# factor, the m the mean-over-rows-vs-sum-over-steps factor (derivations §12 pitfalls).

def pathwise(rows, steps_summed: int = 1) -> torch.Tensor:
    """C1·a² = D·m/2 per row (m = number of per-step terms the original sums per sample)."""
    D = rows.x[0].numel()
    return torch.full((len(rows),), D * steps_summed / 2, dtype=rows.x.dtype)


def vgg_eta(process, rows, mode: str = "quad") -> torch.Tensor:
    """VGG-Flow's temporal factor η(σ) (RSM code ``eta_mode``, derivations §5.3/§9.2): 'quad' (1−σ)²
    (baseline) or 'linear' (1−σ) (RSM first-order flow redesign); σ = flow time t of the row."""
    if process.kind != "flow":
        raise ValueError("vgg_eta applies to the flow process only")
    one_minus = 1 - process.t[rows.step].to(rows.x.dtype)
    if mode == "quad":
        return one_minus**2
    if mode == "linear":
        return one_minus
    raise ValueError(f"unknown eta mode {mode!r}; choose 'quad' or 'linear'")


# ---- first-order matching family (∇-DB, SQDF): transition-score weights --------------------------
# ∇-DB regresses k·s̃_θ onto k·s̃_ref + λ·κ·G, with s̃ = ∇_{x'} log p(x'|x) = −(x'−μ)/σ² the transition
# score; s̃_θ − s̃_ref = (μ_θ − μ_ref)/σ² = (B/σ²)·(o_θ − o_ref) (derivations §2.2), so the forward loss is
# C1·a² = (k·B/σ²)² times a native matching loss with γ·Ψ̂/a = κ·σ²·λ·G/(k·B) (derivations §8.3).

def transition_matching(process, rows, strength=1.0) -> torch.Tensor:
    """C1·a² = (k·B_i/σ_i²)² per row (∇-DB forward loss; k = ``pretrained_strength``)."""
    B = process.sde.B[rows.step].to(rows.x.dtype)
    std = process.sde.std[rows.step].to(rows.x.dtype)
    return (torch.as_tensor(strength, dtype=rows.x.dtype) * B / std**2) ** 2


def nabla_db_kappa(process, rows, mode: str = "squared", sigma_scale: float = 1.0) -> torch.Tensor:
    """∇-DB's reward factor κ of the next state x_{t'} (``reward_adaptive_mode``): 'squared' ᾱ_{t'}
    (default), 'sqrt' √ᾱ_{t'} (nabla-gfn's other branch), 'sigma' s·σ_t (step std, RSM §9.1),
    'constant' 1. ᾱ_{t'} is the clamped previous timestep's ᾱ (ᾱ_0 at the last step), as the code."""
    if process.kind != "diffusion":
        raise ValueError("nabla_db_kappa applies to the diffusion process only")
    ab_next = process.alphas_cumprod_prev[rows.step].to(rows.x.dtype)
    if mode == "squared":
        return ab_next
    if mode == "sqrt":
        return ab_next.sqrt()
    if mode == "sigma":
        return sigma_scale * process.sde.std[rows.step].to(rows.x.dtype)
    if mode == "constant":
        return torch.ones_like(ab_next)
    raise ValueError(f"unknown reward_adaptive_mode {mode!r}; choose squared, sqrt, sigma or constant")


def discount(process, rows, gamma_d: float) -> torch.Tensor:
    """SQDF's discount γ_d^(N−1−i) for transition i → i+1 (steps left after it; SQDF code
    ``sqdf_gamma ** time_tensor``): 1 on the last transition, smallest at the noisiest."""
    left = (process.num_steps - 1 - rows.step).to(rows.x.dtype)
    return torch.as_tensor(gamma_d, dtype=rows.x.dtype) ** left


# ---- which steps a first-order matching method trains (∇-DB, RSM-FO, VGG-Flow) ----------------------
# The official trainers do not train every step of a trajectory: with ``timestep_fraction`` f < 1 they
# train n = ⌊N·f⌋ + 1 steps per sample, the last step always plus, with ``low_var_subsampling``, one
# uniform step from each of the n − 1 contiguous blocks ("trunks") of N/(n − 1) steps, or, without it,
# n − 1 distinct uniform steps of the first N − 1. The last block contains the last step, so under
# low-variance subsampling its expected count is 1 + (n − 1)/N: the temporal weight of the final step is
# 1 + N/(n − 1) = 6× that of any other step at N = 50, f = 0.2 (11× at f = 0.1). Sources:
# jaylee2000/rsm@e8be3df sd15_first_order/trainer/ddptrainer.py:140-145 (n), :933-967 (the draw);
# lzzcd001/nabla-gfn@6b74d4c train_nablagfn.py:324, :503-534; lzzcd001/vggflow@978f1fb
# train_vggflow.py:378-380, :535-575 (which also clamps every index to ≥ 1: ``min_step``).

def train_steps(num_steps: int, n_samples: int, fraction: float = 1.0, low_var: bool = True,
                generator: torch.Generator | None = None, min_step: int = 0) -> torch.Tensor:
    """(n_samples, n) long: the process steps each sample trains, drawn as the official trainers do
    (see above); fraction 1 is every step once. Steps may repeat (the last step under low_var)."""
    N = int(num_steps)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep_fraction must lie in (0, 1], got {fraction}")
    n_blocks = int(N * fraction)
    if fraction >= 1.0 or n_blocks >= N:
        steps = torch.arange(N).expand(n_samples, N)
    elif low_var:
        if n_blocks < 1 or N % n_blocks:
            raise ValueError(f"low-variance subsampling needs ⌊N·f⌋ ≥ 1 blocks that divide N = {N} "
                             f"(timestep_fraction {fraction} gives {n_blocks})")
        size = N // n_blocks
        offset = torch.randint(0, size, (n_samples, n_blocks), generator=generator)
        steps = torch.cat([torch.full((n_samples, 1), N - 1), torch.arange(n_blocks) * size + offset], dim=1)
    else:
        perm = torch.stack([torch.randperm(N - 1, generator=generator)[:n_blocks] for _ in range(n_samples)])
        steps = torch.cat([torch.full((n_samples, 1), N - 1), perm.reshape(n_samples, n_blocks)], dim=1)
    return steps.clamp(min=min_step).long()


def select_train_rows(rows, steps: torch.Tensor):
    """The rows of a full-trajectory ``Transitions`` (sample-major, every step 0…N−1 of each sample)
    at the given (B, n) steps, in sample-major order; a repeated step gives a repeated row."""
    B, n = steps.shape
    N = len(rows) // B
    if N * B != len(rows) or not torch.equal(rows.step[:N], torch.arange(N)):
        raise ValueError("select_train_rows needs every step of every sample, sample-major")
    return rows.select((torch.arange(B).unsqueeze(1) * N + steps).reshape(-1))


def subsampled_rows(rows, process, hp: dict, seed: int, min_step: int = 0):
    """The rows of the steps ``train_steps`` draws for a batch (hp ``timestep_fraction`` (1: every row),
    ``low_var_subsampling``, ``subsample_seed``; the generator is seeded with ``subsample_seed`` + seed)."""
    frac = float(hp.get("timestep_fraction", 1.0))
    if frac >= 1.0 and min_step == 0:
        return rows
    B = len(rows) // process.num_steps
    gen = torch.Generator().manual_seed(int(hp.get("subsample_seed", 0)) + int(seed))
    steps = train_steps(process.num_steps, B, frac, bool(hp.get("low_var_subsampling", True)), gen, min_step)
    return select_train_rows(rows, steps)


# ---- zeroth-order tree / localisation methods (TempFlow-GRPO, Branch-GRPO, RSM-ZO) -----------------
# Credits κ_t for ``relative_gamma`` (γ = κ_t/w_t); RSM-ZO flow uses ``kappa_guard`` (c_t), RSM-ZO
# diffusion the constant κ = w/s of PCPO-reweight (derivations §8.6).

def kappa_noise_aware(process, rows, scale: float = 2.25) -> torch.Tensor:
    """TempFlow-GRPO's noise-aware weight (arXiv 2508.04324; RSM code ``tempflow_reweight``):
    the PPO term × scale·σ_s (σ_s = σ̃√Δt), so κ = scale·σ_s·w_t = scale·c_t·Δt (derivations §5.3)."""
    return scale * (process.std(rows.step) * process.weight(rows.step)).to(rows.x.dtype)


def branch_count_weight(k_row: torch.Tensor, k_avg: float) -> torch.Tensor:
    """k_avg/k per row (RSM code, derivations §9.3–9.4): every branching transition weighs the same
    whatever its number of branches k; k_avg is the mean k over the branching transitions."""
    return k_avg / k_row.to(torch.float64)

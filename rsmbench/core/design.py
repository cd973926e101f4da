"""Design-space knobs applied to any method's RSM instance: the sweep axes over temporal weight
and trust region (RSM axes 2 and 3, derivations §5–§6) that are not already a method hyperparameter.

They act on the RSM formulation only (``train`` applies them to ``rsm_spec``'s output), so a knob
turned away from its default makes a new RSM instance with no "original" counterpart.

- ``temporal`` multiplies C1 (hence the guidance strength C1·γ and any KL pull) at step t by a
  profile f(t), normalised to mean 1 over the process grid so the total strength is unchanged:
    own          f = 1 (the method's own profile; the default)
    snr          f ∝ SNR(t)^p (diffusion SNR = ᾱ/(1−ᾱ); flow SNR = ((1−t)/t)², clamped ≥ 1e-4)
    uniform      f ∝ 1/w_t (flattens a likelihood-ratio method's κ(t) = w_t, as PCPO-reweight, §8.6)
    step_size    f ∝ Δt/w_t (flow: credit ∝ step size, as PCPO-reweight flow, §8.7)
    low_snr / high_snr  f = 1 on the half of the grid with the lower / higher SNR, 0 elsewhere
  with p = ``temporal_power``.
- ``trust_c2`` adds a soft trust region C2·a² (native units) toward s_θ† on every row (§6).
"""
from __future__ import annotations

import torch

TEMPORAL = ("own", "snr", "uniform", "step_size", "low_snr", "high_snr")


def snr(process) -> torch.Tensor:
    if process.kind == "diffusion":
        ab = process.alphas_cumprod_t
        return ab / (1 - ab)
    t = process.t
    return (((1 - t) / t) ** 2).clamp(min=1e-4)


def temporal_profile(process, kind: str = "own", power: float = 1.0) -> torch.Tensor:
    """f(t) on the process grid (N,), mean 1."""
    if kind not in TEMPORAL:
        raise ValueError(f"unknown temporal profile {kind!r}; choose from {', '.join(TEMPORAL)}")
    s, w = snr(process), process.weight()
    if kind == "own":
        f = torch.ones_like(s)
    elif kind == "snr":
        f = s**power
    elif kind == "uniform":
        f = 1 / w
    elif kind == "step_size":
        dt = process.dt if process.kind == "flow" else torch.ones_like(w)
        f = dt / w
    else:
        order = torch.argsort(s)  # ascending SNR
        half = torch.zeros_like(s)
        n = len(s)
        idx = order[: n - n // 2] if kind == "low_snr" else order[n // 2:]
        half[idx] = 1.0
        f = half
    return f / f.mean()


def apply(spec, process, hp: dict):
    """Return the spec with the design knobs in `hp` applied (a no-op for the defaults)."""
    kind = hp.get("temporal", "own")
    if kind != "own":
        f = temporal_profile(process, kind, float(hp.get("temporal_power", 1.0)))
        spec.c1 = spec.c1 * f[spec.rows.step].to(spec.c1.dtype)
    c2 = float(hp.get("trust_c2", 0.0))
    if c2:
        spec.c2 = spec.c2 + c2
    return spec

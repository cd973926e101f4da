"""The one RSM loss (RSM, arXiv 2604.17415, Table 1 caption; project-page form):

    L(θ) = E_rows[ C1(t)·‖s_θ − sg(s_anchor + γ(t)·Ψ̂)‖² + C2(t)·‖s_θ − sg(s_θ†)‖² ]

with ‖·‖² the per-element mean ⟨(·)²⟩ over the sample's elements (not the sum: a sum would be
D times larger, the factor-of-D pitfall of derivations §12), and E_rows the mean over training rows
(sample × step transitions). s_anchor is s_ref (KL-regularised methods) or s_θ† (KL-free
methods, where the reference is the behaviour policy: Table 1 footnote * as derivations §7
reads it). Ψ̂ and the anchors are stop-gradient targets.

It is computed in the network's native output space. With the score map s = a·o + b·x of
``rsmbench.core.process`` (a = −1/√(1−ᾱ_t) for ε, a = −(1−t)/t for v):

    s_θ − s' = a·(o_θ − o'),   so   C1·‖s_θ − s_anchor − γΨ̂‖² = (C1·a²)·‖o_θ − o_anchor − γ·Ψ̂/a‖².

``RSMSpec`` therefore carries C1 and C2 already multiplied by a² and Ψ̂ already divided by a
("native units"); ``to_native`` / ``to_score`` convert. At flow's t = 1 the score does not
depend on v (a = 0): there only the native form is finite, and it is the limit of the score form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsmbench.core.rollout import Transitions

ANCHORS = ("ref", "behaviour")


@dataclass
class RSMSpec:
    """An RSM instance on a set of rows, in native units (see module docstring).

    psi:   (R, *shape) Ψ̂/a, the guidance as a shift of the native-output target
    gamma: (R,) temporal scale γ(t)
    c1:    (R,) C1·a²  (per-row; folds in any per-row weight such as k_avg/k)
    c2:    (R,) C2·a²
    anchor: 'ref' or 'behaviour', or a (R,) bool tensor (True: the row anchors on s_ref, False: on
            s_θ†) for instances that mix KL-anchored and KL-free rows (RSM-ZO's ODE KL anchors)
    """

    rows: Transitions
    psi: torch.Tensor
    gamma: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    anchor: str | torch.Tensor = "ref"

    def __post_init__(self):
        R = len(self.rows)
        if isinstance(self.anchor, torch.Tensor):
            if self.anchor.dtype != torch.bool or self.anchor.shape != (R,):
                raise ValueError(f"a per-row anchor must be a bool tensor of shape ({R},)")
        elif self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        for name in ("gamma", "c1", "c2"):
            v = torch.as_tensor(getattr(self, name), dtype=self.rows.x.dtype)
            setattr(self, name, v.expand(R).clone() if v.dim() == 0 else v)
            if getattr(self, name).shape != (R,):
                raise ValueError(f"{name} must have shape ({R},), got {tuple(getattr(self, name).shape)}")
        if self.psi.shape != self.rows.x.shape:
            raise ValueError(f"psi shape {tuple(self.psi.shape)} != row state shape {tuple(self.rows.x.shape)}")


def to_native(a: torch.Tensor, c1=None, psi=None, c2=None):
    """Score-unit (C1, Ψ̂, C2) → native units (C1·a², Ψ̂/a, C2·a²); `a` broadcasts per row."""
    a_el = a.reshape(a.shape + (1,) * ((psi.dim() - a.dim()) if psi is not None else 0))
    return (None if c1 is None else c1 * a**2,
            None if psi is None else psi / a_el,
            None if c2 is None else c2 * a**2)


def to_score(a: torch.Tensor, c1=None, psi=None, c2=None):
    """Inverse of ``to_native`` (infinite/zero where a = 0)."""
    a_el = a.reshape(a.shape + (1,) * ((psi.dim() - a.dim()) if psi is not None else 0))
    return (None if c1 is None else c1 / a**2,
            None if psi is None else psi * a_el,
            None if c2 is None else c2 / a**2)


def elementwise_mean(z: torch.Tensor) -> torch.Tensor:
    """⟨z⟩ per row: mean over every non-batch dimension."""
    return z.reshape(z.shape[0], math.prod(z.shape[1:])).mean(dim=1)  # explicit width: 0 rows is fine


def rsm_loss_rows(out_theta: torch.Tensor, out_ref: torch.Tensor, spec: RSMSpec) -> torch.Tensor:
    """Per-row RSM loss, given the trainable output o_θ and the reference output o_ref on the
    spec's rows (both CFG-combined, from the same ``Policy`` calls as the original loss)."""
    rows = spec.rows
    if isinstance(spec.anchor, torch.Tensor):
        anchor = torch.where(spec.anchor.reshape(-1, *([1] * (out_theta.dim() - 1))), out_ref, rows.out_behaviour)
    else:
        anchor = out_ref if spec.anchor == "ref" else rows.out_behaviour
    g = spec.gamma.reshape(-1, *([1] * (out_theta.dim() - 1)))
    target = (anchor + g * spec.psi).detach()
    match = elementwise_mean((out_theta - target) ** 2)
    trust = elementwise_mean((out_theta - rows.out_behaviour.detach()) ** 2)
    return spec.c1 * match + spec.c2 * trust


def rsm_loss(policy, ref_policy, spec: RSMSpec) -> torch.Tensor:
    """E_rows of the RSM loss: evaluates o_θ (with grad) and o_ref (without) on the rows."""
    rows = spec.rows
    out_theta = policy(rows.x, rows.step, rows.cond)
    if isinstance(spec.anchor, torch.Tensor) or spec.anchor == "ref":
        with torch.no_grad():
            out_ref = ref_policy(rows.x, rows.step, rows.cond)
    else:
        out_ref = rows.out_behaviour
    return rsm_loss_rows(out_theta, out_ref, spec).mean()

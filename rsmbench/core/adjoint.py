"""Adjoints of the discrete sampling chain, by backward VJPs along a stored path.

For the affine Gaussian step of ``rsmbench.core.process`` with the noise ξ_i held fixed,

    x_{i+1} = A_i·x_i + B_i·o(x_i, t_i) + σ_i·ξ_i,     ∂x_{i+1}/∂x_i = A_i·I + B_i·∂o/∂x_i,

the adjoint of a terminal function f(x_N) is a_N = ∇f(x_N) and

    a_i = A_i·a_{i+1} + (∂o(x_i)/∂x_i)ᵀ·(B_i·a_{i+1})                 (one VJP per step).

- ``chain_adjoint(behaviour, …)``: the exact adjoint a_i = d r(x_N)/d x_i of the behaviour chain
  (θ†), the Ψ̂ of DRaFT/AlignProp's RSM instance (derivations §8.11): by the chain rule,
  ∇_θ r(x_N(θ))|_{θ†} = Σ_i a_{i+1}ᵀ·B_i·∂o_θ(x_i)/∂θ with x_i held at their rollout values.
  ``through_net`` (a bool per position) drops the network term of the steps whose output is detached
  in the original (AlignProp's per-step truncation): there a_i = A_i·a_{i+1}.
- ``lean_adjoint(base, …)``: Adjoint Matching's lean adjoint (Domingo-Enrich et al. 2024,
  arXiv 2409.08861, §4, the "lean adjoint" ODE dã/dt = −(∇_x b(X_t, t))ᵀ·ã,
  ã(1) = −λ∇r(X_1)), discretised on the sampler grid: the same recursion through the *base*
  (reference) drift μ_ref, started from ã_N = −λ·∇r(x_N). In the ODE / memoryless case this is
  exactly −λ times the autograd gradient of r(x_N) w.r.t. x_i through the frozen base chain.

Networks are evaluated per sample (no cross-sample coupling), so one batched VJP gives every
sample's adjoint.
"""
from __future__ import annotations

import torch

from rsmbench.core.models import Policy
from rsmbench.core.rollout import Rollout


def vjp_step(policy: Policy, x: torch.Tensor, i: int, cond, a_next: torch.Tensor, stochastic: bool = True,
             through_net: bool = True):
    """(∂x_{i+1}/∂x_i)ᵀ·a_next for one step of `policy` at state x (no graph is kept);
    ``through_net=False``: the step's network output held fixed, A_i·a_next."""
    tab = policy.process.table(stochastic)
    A = tab.A[i].to(x.dtype)
    B = tab.B[i].to(x.dtype)
    if not through_net:
        return A * a_next
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        out = policy(z, i, cond)
        (g,) = torch.autograd.grad(out, z, grad_outputs=B * a_next)
    return A * a_next + g


@torch.no_grad()
def chain_adjoint(policy: Policy, rollout: Rollout, terminal_grad: torch.Tensor,
                  first: int = 0, through_net=None) -> torch.Tensor:
    """a_j = d f(x_N)/d x_j along the stored path, for rollout positions j = first … n.

    Returns (B, n+1, *shape) with zeros before `first` (positions are rollout-local: position j
    is the state before the rollout's j-th transition, position n the final sample).
    through_net: bool per transition (default all True), see the module docstring.
    """
    n = rollout.steps.numel()
    adj = torch.zeros_like(rollout.states)
    a = terminal_grad.to(rollout.states.dtype)
    adj[:, n] = a
    for j in range(n - 1, first - 1, -1):
        i = int(rollout.steps[j])
        a = vjp_step(policy, rollout.states[:, j], i, rollout.cond, a, bool(rollout.stochastic[j]),
                     True if through_net is None else bool(through_net[j]))
        adj[:, j] = a
    return adj


def lean_adjoint(base: Policy, rollout: Rollout, terminal_grad: torch.Tensor, reward_scale: float = 1.0,
                 first: int = 0) -> torch.Tensor:
    """Adjoint Matching's lean adjoint ã_j along the stored path: ã_N = −λ·∇r(x_N), propagated
    backwards through the base drift (see module docstring)."""
    return chain_adjoint(base, rollout, -reward_scale * terminal_grad, first)

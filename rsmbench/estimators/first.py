"""First-order value-guidance estimators (differentiable reward), in native units Ψ̂/a (see
``rsmbench.rsm``; digest §4.1): current-state Tweedie, next-state, k-step lookahead, terminal
Jacobian-free, and the exact adjoint."""
from __future__ import annotations

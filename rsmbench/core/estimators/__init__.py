"""Value-guidance estimators Ψ̂ (derivations §4), in native units Ψ̂/a (see ``rsmbench.core.rsm``).

``zeroth``: black-box reward (likelihood ratio, control variates, branching).
``first``: differentiable reward (current-state Tweedie, next-state, lookahead, terminal, adjoint).
"""
from rsmbench.core.estimators.zeroth import likelihood_ratio  # noqa: F401

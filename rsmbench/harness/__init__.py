"""Studies of the objective that need no training: gradient equivalence of the two formulations,
temporal influence κ(t)/h(t) and the estimator study."""

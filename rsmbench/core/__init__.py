"""The core: the two sampling processes, tiny networks and their checkpoints, rollouts and trees,
the estimators Ψ̂, the weights γ/C1, the trust regions C2, advantages, the one RSM loss and the
method base class with its registry. Imports torch and diffusers, nothing above it."""

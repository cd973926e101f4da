"""Sampling trajectories with a behaviour policy θ†, and flattening them into transition rows.

A rollout stores, per sample and step i (t_i → t_{i+1}): the state x_t, the next state x_{t'},
the injected noise ξ, the behaviour mean μ, the step σ, the behaviour log-prob and the
behaviour network output o_θ† (CFG-combined); plus the final sample x_{t_N}.

Randomness: one ``torch.Generator`` per sample. The initial noise and every ξ of sample b come
from generator b alone, in a fixed order, so a sample's trajectory does not depend on the batch
it is drawn in. Steps can be made deterministic individually (``stochastic`` mask): the ODE root
and SDE windows of the zeroth-order methods are masks over the same loop, and trees are built
by restarting ``sample`` from stored states (``x_start``/``start_step``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rsmbench.core.models import Policy


def generators(seeds) -> list[torch.Generator]:
    """One CPU generator per sample seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_sample_randn(gens, shape, dtype) -> torch.Tensor:
    """Stack one N(0, I) draw of `shape` from each sample's own generator."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]).to(dtype)


@dataclass
class Rollout:
    states: torch.Tensor  # (B, n+1, *shape): x at steps start..end
    noises: torch.Tensor  # (B, n, *shape): ξ (zeros on deterministic steps)
    means: torch.Tensor  # (B, n, *shape): behaviour μ
    outputs: torch.Tensor  # (B, n, *shape): behaviour native output o_θ†
    log_probs: torch.Tensor  # (B, n): behaviour ⟨log p⟩ (NaN on deterministic steps)
    steps: torch.Tensor  # (n,): process step index of each transition
    stochastic: torch.Tensor  # (n,) bool
    cond: torch.Tensor | None  # (B,) prompt ids

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    def transitions(self, only_stochastic: bool = True) -> "Transitions":
        """Flatten (sample, step) pairs into rows, sample-major."""
        keep = self.stochastic if only_stochastic else torch.ones_like(self.stochastic)
        idx = torch.nonzero(keep).flatten()
        B, n = self.batch_size, idx.numel()
        flat = lambda z: z[:, idx].reshape(B * n, *z.shape[2:])  # noqa: E731
        return Transitions(
            x=flat(self.states[:, :-1]), x_next=flat(self.states[:, 1:]), noise=flat(self.noises),
            mean=flat(self.means), out_behaviour=flat(self.outputs), log_prob=flat(self.log_probs),
            step=self.steps[idx].repeat(B), stochastic=self.stochastic[idx].repeat(B),
            sample=torch.arange(B).repeat_interleave(n),
            cond=None if self.cond is None else self.cond.repeat_interleave(n),
        )


@dataclass
class Transitions:
    """Training rows: one (state, step) transition each, with everything the behaviour knew."""

    x: torch.Tensor
    x_next: torch.Tensor
    noise: torch.Tensor
    mean: torch.Tensor
    out_behaviour: torch.Tensor
    log_prob: torch.Tensor
    step: torch.Tensor  # (R,) long
    stochastic: torch.Tensor  # (R,) bool
    sample: torch.Tensor  # (R,) which root sample (or leaf/group id) the row belongs to
    cond: torch.Tensor | None

    def __len__(self) -> int:
        return self.x.shape[0]

    def select(self, index) -> "Transitions":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                                for f in fields(self)})


@torch.no_grad()
def sample(policy: Policy, shape, gens, cond=None, stochastic=None, x_start=None,
           start_step: int = 0, end_step: int | None = None, dtype=torch.float32) -> Rollout:
    """Roll out the behaviour policy from step `start_step` to `end_step` (exclusive).

    `shape` is one sample's shape; `x_start` (B, *shape) defaults to per-sample N(0, I) noise.
    `stochastic` is a bool per process step (default: every step stochastic).
    """
    process = policy.process
    N = process.num_steps
    end_step = N if end_step is None else end_step
    B = len(gens)
    if cond is not None and len(cond) != B:
        raise ValueError(f"{len(cond)} conditions for {B} samples")
    if stochastic is None:
        stochastic = torch.ones(N, dtype=torch.bool)
    stochastic = torch.as_tensor(stochastic, dtype=torch.bool)
    if stochastic.shape != (N,):
        raise ValueError(f"stochastic mask must have {N} entries, got {tuple(stochastic.shape)}")
    x = per_sample_randn(gens, shape, dtype) if x_start is None else x_start.to(dtype)
    states, noises, means, outs, lps = [x], [], [], [], []
    for i in range(start_step, end_step):
        sto = bool(stochastic[i])
        out = policy(x, i, cond)
        xi = per_sample_randn(gens, shape, dtype) if sto else torch.zeros_like(x)
        x_next, mu = process.step(x, out, i, xi, stochastic=sto)
        lp = process.log_prob(x_next, mu, i) if sto else torch.full((B,), float("nan"), dtype=dtype)
        states.append(x_next), noises.append(xi), means.append(mu), outs.append(out), lps.append(lp)
        x = x_next
    steps = torch.arange(start_step, end_step)
    st = lambda z: torch.stack(z, dim=1)  # noqa: E731
    return Rollout(states=st(states), noises=st(noises), means=st(means), outputs=st(outs),
                   log_probs=st(lps), steps=steps, stochastic=stochastic[start_step:end_step].clone(),
                   cond=cond)

"""What a method file states, and the registry that finds it.

A method is one class in ``methods/<id>.py`` decorated with ``@register``. It declares its
paper, Table 1 row, equivalence kind, processes and presets, and implements:

- ``collect(ctx, cond, seeds)``: which rollout it trains on, by calling the shared rollout code
  (full SDE trajectories by default; trees and ODE roots come from ``rsmbench.core.rollout``);
- ``prepare(batch, ctx)``: advantages / reward gradients from the batch's rewards (shared code);
- ``original_loss(batch, ctx)``: the method as its authors wrote it;
- ``rsm_spec(batch, ctx)``: its RSM instance (Ψ̂, γ, C1, C2, anchor) for ``rsmbench.core.rsm``.

The two formulations are computed independently: ``rsm_spec`` never calls ``original_loss``
or reuses its terms, and ``original_loss`` never calls the RSM loss. The harness (equivalence,
training) does everything else.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import methods
from rsmbench.core import design, rsm
from rsmbench.core.models import Policy
from rsmbench.core.rollout import Rollout, Transitions, generators, sample

KINDS = ("loss", "grad_at_behaviour", "approximate")
ORDERS = ("zeroth", "first")
REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class Context:
    """Everything a loss may need: the process, the three policies, the reward, hyperparameters."""

    process: object
    policy: Policy  # θ, trainable
    ref: Policy  # frozen reference
    behaviour: Policy  # θ†, frozen copy of θ at collection time
    reward: Callable  # reward(x0, cond) -> (B,)
    hp: dict
    shape: tuple  # one sample's shape


@dataclass
class Batch:
    rollout: Rollout | None
    rows: Transitions
    rewards: torch.Tensor  # (B,) terminal rewards of the collected samples (or leaves)
    cond: torch.Tensor | None
    extras: dict = field(default_factory=dict)  # advantages, groups, reward gradients, ...
    row_data: dict = field(default_factory=dict)  # tensors aligned with `rows` (leading dim = len(rows))

    def select_rows(self, index) -> "Batch":
        """The batch restricted to some training rows; per-row data follows (micro-batches)."""
        return replace(self, rows=self.rows.select(index), row_data={k: v[index] for k, v in self.row_data.items()})


class Method:
    id: str = ""
    processes: tuple = ("diffusion", "flow")
    order: str = "zeroth"
    kind: str = "grad_at_behaviour"
    paper: str = ""  # "Author et al. Year, arXiv XXXX.XXXXX, Eq. N"
    table1: str = ""  # Table 1 row, or "not a Table 1 row (digest §X)"
    kind_reason: str = ""  # why `approximate`, or the conditions of exactness
    # The RSM instance as Table 1 states it (score units, digest §7.2), shown by `rsmbench report`:
    # {"psi": Ψ̂, "gamma": γ(t), "c1": C1(t), "c2": C2(t) / trust region, "branching": bool,
    #  "current_state": bool (‡: a current-state estimator)}
    table_row: dict = {}
    defaults: dict = {}
    presets: dict = {}  # name -> {"source": ..., **hyperparameters}

    def hparams(self, preset: str | None = None, **overrides) -> dict:
        hp = dict(self.defaults)
        if preset is not None:
            if preset not in self.presets:
                raise ValueError(f"{self.id}: unknown preset {preset!r}; choose from {', '.join(self.presets)}")
            hp.update({k: v for k, v in self.presets[preset].items() if k != "source"})
        hp.update(overrides)
        return hp

    # -- defaults that most zeroth-order methods share -------------------------------------------
    def collect(self, ctx: Context, cond, seeds) -> Batch:
        """Full stochastic trajectories from θ†; every step is a training row."""
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, dtype=_dtype(ctx))
        return Batch(rollout=ro, rows=ro.transitions(), rewards=ctx.reward(ro.final, cond), cond=cond)

    def prepare(self, batch: Batch, ctx: Context) -> None:
        pass

    def original_loss(self, batch: Batch, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def rsm_spec(self, batch: Batch, ctx: Context):
        raise NotImplementedError

    # -- state a method keeps across iterations (replay buffers, value networks, trackers) -----------
    def state_dict(self) -> dict:
        """What a resumed run needs of this method's cross-iteration state (tensors, numbers, lists;
        saved with the run's checkpoint and read back with ``torch.load(weights_only=True)``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` (a resumed run)."""


FORMULATIONS = ("rsm", "original")


def formulation_loss(m: Method, formulation: str, batch: Batch, ctx: Context) -> torch.Tensor:
    """The training loss of method `m` in one of its two formulations: its authors' ``original_loss``,
    or the one RSM loss of its ``rsm_spec`` (with the design-space knobs of ``rsmbench.core.design``,
    which act on the RSM instance only). The training loop, the multi-process path, the equivalence
    harness and the GPU check all call this."""
    if formulation == "original":
        return m.original_loss(batch, ctx)
    if formulation == "rsm":
        return rsm.rsm_loss(ctx.policy, ctx.ref, design.apply(m.rsm_spec(batch, ctx), ctx.process, ctx.hp))
    raise ValueError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)}")


def _dtype(ctx: Context):
    return next(ctx.policy.net.parameters()).dtype


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry (checked for a complete declaration)."""
    if not cls.id or cls.id in REGISTRY:
        raise ValueError(f"method id {cls.id!r} is empty or already registered")
    if cls.kind not in KINDS or cls.order not in ORDERS:
        raise ValueError(f"{cls.id}: kind must be one of {KINDS}, order one of {ORDERS}")
    for name, preset in cls.presets.items():
        if "source" not in preset:
            raise ValueError(f"{cls.id}: preset {name!r} does not name its source")
    REGISTRY[cls.id] = cls
    return cls


def load_all() -> dict[str, type[Method]]:
    """Import every module of the ``methods`` package, which registers its classes."""
    for mod in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{mod.name}")
    return REGISTRY


def get(method_id: str) -> Method:
    load_all()
    if method_id not in REGISTRY:
        raise KeyError(f"unknown method {method_id!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method_id]()

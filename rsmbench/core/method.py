"""What a method file states, and the registry that finds it.

A method is one class in ``methods/<id>.py`` decorated with ``@register``. Every fact about it lives in
that file: its paper, Table 1 row, equivalence kind (``equivalence_kind(hp)`` where the kind depends on
the configuration), processes and the ones of its authors' main experiment (``published_processes``),
its hyperparameters with their types and ranges (``defaults``, declared with ``hp``; checked by
``hparams``), its presets, its strength coefficient for ``rsmbench tune`` (``strength``), the preset and
raw signal the influence figure reads (``influence_preset``, ``influence_signal``), its
cross-iteration state (``state_dict``) and its optimizer-step hook (``on_optimizer_step``). It implements:

- ``collect(ctx, cond, seeds)``: which rollout it trains on, by calling the shared rollout code
  (full SDE trajectories by default; trees and ODE roots come from ``rsmbench.core.rollout``);
- ``prepare(batch, ctx)``: advantages / reward gradients from the batch's rewards (shared code);
- ``original_loss(batch, ctx)``: the method as its authors wrote it;
- ``rsm_spec(batch, ctx)``: its RSM instance (Ψ̂, γ, C1, C2, anchor) for ``rsmbench.core.rsm``.

"derivations §N" in a method file refers to section N of ``docs/derivations.md``.

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
from rsmbench.core.params import Param, as_param, check_keys, did_you_mean, hp
from rsmbench.core.rollout import Rollout, Transitions, generators, sample
from rsmbench.errors import TaskError

KINDS = ("loss", "grad_at_behaviour", "approximate")
ORDERS = ("zeroth", "first")
REGISTRY: dict[str, type["Method"]] = {}

# Hyperparameters every method accepts besides its own (not in its defaults: a run spec names them only
# where they are set): the design-space knobs of ``rsmbench.core.design`` (RSM formulation only), two
# loop settings and the full-scale LoRA.
COMMON = {
    "temporal": hp("own", choices=design.TEMPORAL),
    "temporal_power": hp(1.0),
    "trust_c2": hp(0.0, ge=0),
    "inner_updates": hp(None, type=int, ge=1),  # optimizer steps per batch, in place of train.inner_updates
    "budget_reward_queries": hp(None, type=int, ge=1),  # the method's own published budget (--budget published)
    # full scale: the LoRA of rsmbench.run.fullscale.build, in place of the profile's default for the order
    "lora_r": hp(None, type=int, ge=1), "lora_alpha": hp(None, type=float, gt=0),
    "lora_targets": hp(None, type=list, items=hp("", type=str)),
}


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
    table1: str = ""  # Table 1 row, or "not a Table 1 row (derivations §X)"
    kind_reason: str = ""  # why `approximate`, or the conditions of exactness
    # The RSM instance as Table 1 states it (score units, derivations §7.2), shown by `rsmbench report`:
    # {"psi": Ψ̂, "gamma": γ(t), "c1": C1(t), "c2": C2(t) / trust region, "branching": bool,
    #  "current_state": bool (‡: a current-state estimator)}
    table_row: dict = {}
    # name -> default, or ``hp(default, gt=…, choices=…)`` with its type and range; ``@register`` keeps
    # the declarations in ``params`` and the plain defaults here
    defaults: dict = {}
    params: dict[str, Param] = {}
    presets: dict = {}  # name -> {"source": ..., **hyperparameters}
    published_processes: tuple | None = None  # the process(es) of the authors' main experiment (None: all)
    strength: str | None = None  # the hyperparameter ``rsmbench tune`` grids: a KL β, reward scale λ or clip range
    strength_grid: tuple | None = None  # its explicit grid where the default is 0 (a factor grid cannot move it)
    influence_preset: dict = {}  # process -> the preset the influence figure reads on that real grid (absent: defaults)
    # formulations whose loss replays every sample's whole chain, whatever training rows it is given (DRaFT's
    # autograd through the sampler): micro-batching their rows (train.micro_rows) would only repeat the
    # replay, and its reward query, once per chunk, so they always see the whole batch
    whole_chain_formulations: tuple = ()
    influence_rms_ratio: bool = False  # Ψ̂ is not a multiple of the raw signal G: κ is an RMS ratio (influence.py)

    def hparams(self, preset: str | None = None, **overrides) -> dict:
        """Defaults, updated by a preset and the overrides, checked (``validate_hparams``)."""
        hp = dict(self.defaults)
        if preset is not None:
            if preset not in self.presets:
                raise TaskError(f"{self.id}: unknown preset {preset!r}{did_you_mean(preset, self.presets)}; "
                                f"choose from {', '.join(self.presets) or '(none)'}")
            hp.update({k: v for k, v in self.presets[preset].items() if k != "source"})
        hp.update(overrides)
        return self.validate_hparams(hp)

    def validate_hparams(self, hp: dict, where: str | None = None) -> dict:
        """Every name declared (this method's ``params`` or ``COMMON``), every value of its type and in its
        range, then the method's own relations (``check_hparams``); raises ``TaskError`` (one line naming
        `where` the values come from, default the method id)."""
        where = where or self.id
        declared = {**COMMON, **self.params}
        check_keys(hp, declared, where, "hyperparameter")
        out = {k: declared[k].check(v, f"{where}.{k}") for k, v in hp.items()}
        try:
            self.check_hparams(out)
        except TaskError as e:
            raise TaskError(f"{where}: {e}") from None
        return out

    def check_hparams(self, hp: dict) -> None:
        """Relations between hyperparameters that a single range cannot state (raise ``TaskError``)."""

    def equivalence_kind(self, hp: dict) -> tuple[str, str]:
        """(kind, reason) of this configuration: the class's ``kind``/``kind_reason`` unless a setting
        changes it (e.g. VGG-Flow's learned value network makes it ``approximate``)."""
        return self.kind, self.kind_reason

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

    def on_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step (e.g. VGG-Flow's clip threshold update)."""

    # -- what the influence figure reads (rsmbench.harness.influence) -------------------------------------
    def influence_signal(self, batch: Batch, ctx: Context, rows: Transitions) -> torch.Tensor:
        """The raw signal G per row of `rows` that the method's Ψ̂ is a multiple of: zeroth order A·ξ,
        first order the stop-gradient reward gradient it uses (default: the terminal ∇_{x_0} r of the
        row's trajectory, ``batch.extras["terminal_grad"]``)."""
        if self.order == "zeroth":
            A = batch.extras["advantages"][rows.sample].to(rows.noise.dtype)
            return A.reshape(-1, *([1] * (rows.noise.dim() - 1))) * rows.noise
        if "terminal_grad" not in batch.extras:
            raise NotImplementedError(f"{self.id}: a first-order method without batch.extras['terminal_grad'] "
                                      "declares influence_signal (where its raw reward gradient G is kept)")
        return batch.extras["terminal_grad"][rows.sample]


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
    """Class decorator: add a method to the registry (checked for a complete declaration). The
    declarations of ``defaults`` go to ``params``; ``defaults`` keeps the plain default values."""
    if not cls.id or cls.id in REGISTRY:
        raise ValueError(f"method id {cls.id!r} is empty or already registered")
    if cls.kind not in KINDS or cls.order not in ORDERS:
        raise ValueError(f"{cls.id}: kind must be one of {KINDS}, order one of {ORDERS}")
    if "defaults" in cls.__dict__:  # its own declarations (else the parent's, already split)
        cls.params = {k: as_param(v) for k, v in cls.defaults.items()}
        cls.defaults = {k: p.default for k, p in cls.params.items()}
    for name, preset in cls.presets.items():
        if "source" not in preset:
            raise ValueError(f"{cls.id}: preset {name!r} does not name its source")
    if cls.published_processes is None:
        cls.published_processes = tuple(cls.processes)
    if not cls.published_processes or not set(cls.published_processes) <= set(cls.processes):
        raise ValueError(f"{cls.id}: published_processes {cls.published_processes} must be some of {cls.processes}")
    if cls.strength is not None and cls.strength not in cls.defaults:
        raise ValueError(f"{cls.id}: strength {cls.strength!r} is not one of its hyperparameters")
    if cls.strength is not None and not cls.defaults[cls.strength] and not cls.strength_grid:
        raise ValueError(f"{cls.id}: strength {cls.strength!r} defaults to {cls.defaults[cls.strength]!r}: "
                         "declare strength_grid (a factor grid cannot move it)")
    for kind, name in cls.influence_preset.items():
        if kind not in cls.processes or name not in cls.presets:
            raise ValueError(f"{cls.id}: influence_preset {kind}: {name!r} is not one of its processes/presets")
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

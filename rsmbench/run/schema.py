"""The schema of a task file: every value a user can set in ``tasks/<name>.yaml`` or with a dotted
override, with its type and range, checked once the file, its ``base:`` chain, the profile and the
overrides are merged (``tasks.load``). Method hyperparameters (``methods.<id>``) are checked by each
method's own declarations (``Method.validate_hparams``).

Each section is a dataclass; a field's annotation is its type (``X | None``: null allowed, ``list[X]``,
``Literal[...]``: the choices, a dataclass: a sub-section) and ``value(...)`` declares its range next
to it (``rsmbench.core.params.Param``). A field without a default is required. Unknown keys are
errors that name the valid ones. Then ``validate`` checks what no single field can: the relations
between sections (``bench.processes`` among the task's processes, the divergence ranges, prompt ids
against the network's classes, what the tiny profile needs). Every error is a ``TaskError``: one line
naming the task, the dotted key, what it accepts and what it got.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import List, Literal

from rsmbench.core import method as registry
from rsmbench.core.params import Param, _show, check_keys, did_you_mean
from rsmbench.core.process import KINDS
from rsmbench.data import gmm
from rsmbench.errors import TaskError

_REQUIRED = dataclasses.MISSING
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def value(default=_REQUIRED, **range_) -> dataclasses.Field:
    """A schema field: its default (none: required) and its range (``gt``, ``ge``, ``le``, ``items``, …)."""
    return field(default=None if default is _REQUIRED else default,
                 metadata={"required": default is _REQUIRED, "range": range_})


# ---- processes.<kind> ------------------------------------------------------------------------------
@dataclass
class Scheduler:  # diffusers DDIMScheduler arguments the diffusion process uses (rsmbench.core.process)
    num_train_timesteps: int = value(1000, ge=1)
    beta_schedule: Literal[BETA_SCHEDULES] = value("scaled_linear")
    beta_start: float = value(0.00085, gt=0, lt=1)
    beta_end: float = value(0.012, gt=0, lt=1)
    steps_offset: int = value(1, ge=0)
    # the process clamps t' at 0 (ᾱ_{t'} = ᾱ_0) so that the last step keeps σ > 0, and never clips x̂₀
    set_alpha_to_one: Literal[(False,)] = value(False)
    clip_sample: Literal[(False,)] = value(False)


@dataclass
class DiffusionProcess:
    num_steps: int = value(ge=1)
    eta: float = value(gt=0, le=1)  # DDIM η; 0 (deterministic) has no stochastic step to train or take a KL of
    scheduler: Scheduler | None = value(None)


@dataclass
class FlowProcess:
    num_steps: int = value(ge=1)
    noise_level: float = value(gt=0)  # Flow-GRPO's a; 0 is the ODE, with no stochastic step
    shift: float = value(3.0, gt=0)


@dataclass
class Model:
    arch: Literal["mlp", "unet", "text_unet"] = value()  # rsmbench.core.models.ARCHS
    net: dict = value()  # the network's arguments (rsmbench.core.models.build_net)
    checkpoint: str | None = value(None)  # the committed base network (tiny profile)


@dataclass
class Pretrain:  # rsmbench pretrain
    objective: Literal["epsilon", "flow_matching", "v"] = value()
    steps: int = value(ge=1)
    batch: int = value(ge=1)
    lr: float = value(gt=0)
    ema: float = value(0.0, ge=0, lt=1)
    seed: int = value(0, ge=0)
    weight_decay: float = value(0.0, ge=0)
    cond_dropout: float = value(0.0, ge=0, lt=1)  # CFG's null prompt trained in


@dataclass
class ProcessSection:
    process: dict = value()  # DiffusionProcess or FlowProcess, by the key
    model: Model = value()
    pretrain: Pretrain | None = value(None)


# ---- the other sections ----------------------------------------------------------------------------------
@dataclass
class Data:
    source: str = value()
    module: str | None = value(None)
    cfg: dict | None = value(None)


@dataclass
class Reward:
    name: str = value()
    cfg: dict | None = value(None)


@dataclass
class Prompts:  # (typing.List: the field `list` shadows the builtin in this class's namespace)
    names: List[str] | None = value(None)  # noqa: UP006
    train: List[int] | None = value(None, items=Param(0, ge=0))  # noqa: UP006
    eval: List[int] | None = value(None, items=Param(0, ge=0))  # noqa: UP006
    list: str | None = value(None)  # full scale: tasks/prompts/<list>.txt
    per_iteration: int | None = value(None, ge=1)


@dataclass
class Train:
    batch_per_prompt: int = value(ge=1)
    lr: float = value(gt=0)
    weight_decay: float = value(ge=0)
    grad_clip: float = value(gt=0)
    inner_updates: int = value(ge=1)
    cfg_scale: float | None = value(ge=0)  # null: the full-scale profile's
    dtype: Literal[DTYPE_NAMES] = value()
    checkpoint_every: int = value(ge=1)
    max_iterations: int = value(ge=1)
    micro_rows: int = value(0, ge=0)


@dataclass
class Budget:
    reward_queries: int = value(ge=1)
    mode: Literal["matched", "published"] = value("matched")


@dataclass
class Eval:
    points: int = value(ge=1)
    prompts: list[int] | None = value(items=Param(0, ge=0))  # null: full scale, the list's first num_samples
    seed_start: int = value(ge=0)
    num_samples: int = value(ge=2)  # a std, a diversity and a Fréchet distance need two samples
    sampler: Literal["sde", "ode"] = value()
    path_kl: bool = value(True)
    kl_samples: int = value(0, ge=0)  # the path KL over k eval samples, every prompt once first (0: all)
    jstar_samples: int = value(0, ge=0)


@dataclass
class Bench:
    processes: object = value("published")  # 'published' or a list of the task's processes (validate)
    seeds: int = value(1, ge=1)
    formulation: Literal["original", "rsm", "both"] = value("original")
    metric: str = value("eval/reward_mean")
    higher_is_better: bool = value(True)


@dataclass
class Divergence:  # a run outside these stops as diverged (rsmbench.run.train.Guard)
    reward: list[float] | None = value(None, length=2, items=Param(0.0, finite=False))
    kl: float | None = value(None, gt=0, finite=False)
    loss: float | None = value(None, gt=0, finite=False)


@dataclass
class Tune:
    lr: list[float] | None = value(None, items=Param(0.0, gt=0))
    strength: list[float] | None = value(None, items=Param(0.0, gt=0))
    seeds: int = value(1, ge=1)


@dataclass
class FullScale:  # rsmbench.run.fullscale
    profile: Literal["sd15", "sd35"] = value()
    precision: Literal["bf16", "fp16", "fp32", "fp64"] = value("bf16")
    resolution: int | None = value(None, ge=8)
    num_steps: int | None = value(None, ge=1)
    eval_steps: int | None = value(None, ge=1)
    cfg_scale: float | None = value(None, ge=0)
    lora: dict | None = value(None)
    device: str | None = value(None)


@dataclass
class Task:
    name: str = value()
    title: str = value("")
    alpha: float = value(0.0, ge=0)
    profile: Literal["tiny", "sd15", "sd35"] = value("tiny")
    data: Data | None = value(None)
    processes: dict = value()  # kind -> ProcessSection
    reward: Reward = value()
    reward_first_order: Reward | None = value(None)  # the differentiable form first-order methods train on
    prompts: Prompts = value()
    train: Train = value()
    budget: Budget = value()
    eval: Eval = value()
    bench: Bench | None = value(None)
    divergence: Divergence | None = value(None)
    tune: Tune | None = value(None)
    methods: dict | None = value(None)  # id -> hyperparameters (each method's own declarations)
    model: str | None = value(None)  # full scale: a diffusers directory or hub id
    fullscale: FullScale | None = value(None)


PROCESS_SCHEMAS = {"diffusion": DiffusionProcess, "flow": FlowProcess}


# ---- the check --------------------------------------------------------------------------------------------
def check_section(cls, values, where: str) -> None:
    """`values` (a plain mapping) against the dataclass `cls`: keys, required fields, types, ranges."""
    if not isinstance(values, dict):
        raise TaskError(f"{where} must be a mapping, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    check_keys(values, hints, where or "the task file")
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in values:
            if f.metadata["required"]:
                raise TaskError(f"{where or 'the task file'} lacks {f.name!r}")
            continue
        hint, v = hints[f.name], values[f.name]
        sub, nullable = _unwrap(hint)
        if dataclasses.is_dataclass(sub):
            if v is None and nullable:
                continue
            check_section(sub, v, key)
        else:
            _param(hint, f.metadata["range"]).check(v, key)


def _unwrap(hint):
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _param(hint, range_: dict) -> Param:
    t, nullable = _unwrap(hint)
    kw = dict(range_)
    if typing.get_origin(t) is Literal:
        return Param(None, choices=typing.get_args(t), null=nullable)
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t)
        kw.setdefault("items", Param(None, type=item, null=False))
        return Param(None, type=list, null=nullable, **kw)
    return Param(None, type=None if t is object else t, null=nullable, **kw)


def validate(cfg: dict, name: str | None = None) -> None:
    """A merged task config (plain, resolved) against the schema and its cross-section relations;
    `name`: the task as the user named it (else the config's own ``name``)."""
    where = f"task {name or cfg.get('name') or '?'!r}"
    try:
        _validate(cfg)
    except TaskError as e:
        raise TaskError(f"{where}: {e}") from None


def _validate(cfg: dict) -> None:
    check_section(Task, cfg, "")
    procs = cfg["processes"]
    if not isinstance(procs, dict) or not procs:
        raise TaskError(f"processes must map a process ({', '.join(KINDS)}) to its section, got {_show(procs)}")
    for kind, sec in procs.items():
        if kind not in KINDS:
            raise TaskError(f"unknown process {kind!r}{did_you_mean(kind, KINDS)}; choose from {', '.join(KINDS)}")
        check_section(ProcessSection, sec, f"processes.{kind}")
        check_section(PROCESS_SCHEMAS[kind], sec["process"], f"processes.{kind}.process")
        _v_head(kind, sec)
    bench = cfg.get("bench") or {}
    listed = bench.get("processes", "published")
    if listed != "published" and (not isinstance(listed, list) or not listed or any(k not in procs for k in listed)):
        raise TaskError(f"bench.processes must be 'published' or a list of the task's processes "
                        f"({', '.join(procs)}), got {_show(listed)}")
    rng = (cfg.get("divergence") or {}).get("reward")
    if rng is not None and not rng[0] < rng[1]:
        raise TaskError(f"divergence.reward must be [low, high] with low < high, got {rng}")
    data = cfg.get("data") or {}
    if data.get("source") == "gmm":  # the bench builds the exact optimum from it
        try:
            gmm.MixtureData(**(data.get("cfg") or {}))
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            raise TaskError(f"data.cfg does not describe a Gaussian mixture: {str(e).splitlines()[0]}") from None
    if cfg.get("profile", "tiny") == "tiny":
        _tiny(cfg)
    elif not cfg.get("fullscale"):
        raise TaskError(f"profile {cfg['profile']!r} lacks its 'fullscale' section")
    for mid, entry in (cfg.get("methods") or {}).items():
        _method_entry(mid, entry)


def _v_head(kind: str, sec: dict) -> None:
    """A ``v_head`` (models.VHead) is an ε-predictor's, and its net is pretrained with the ``v`` objective."""
    head = isinstance(sec["model"]["net"], dict) and sec["model"]["net"].get("v_head") is not None
    if head and kind != "diffusion":
        raise TaskError(f"processes.{kind}.model.net.v_head is for the diffusion process only")
    objective = (sec.get("pretrain") or {}).get("objective")
    if objective is not None and (objective == "v") != head:
        raise TaskError(f"processes.{kind}.pretrain.objective {objective!r} needs "
                        f"{'a' if objective == 'v' else 'no'} model.net.v_head")


def _tiny(cfg: dict) -> None:
    """What the tiny profile builds from: a checkpoint per process, prompt ids, a CFG scale."""
    if cfg["train"]["cfg_scale"] is None:
        raise TaskError("train.cfg_scale must be a number >= 0 on the tiny profile, got null")
    if not cfg["prompts"].get("train"):
        raise TaskError("prompts.train must be a non-empty list of prompt ids on the tiny profile")
    if not cfg["eval"]["prompts"]:
        raise TaskError("eval.prompts must be a non-empty list of prompt ids on the tiny profile")
    per_it, n_train = cfg["prompts"].get("per_iteration"), len(cfg["prompts"]["train"])
    if per_it is not None and per_it > n_train:
        raise TaskError(f"prompts.per_iteration = {per_it} draws more distinct prompts than the "
                        f"{n_train} of prompts.train")
    ids = set(cfg["prompts"]["train"]) | set(cfg["eval"]["prompts"]) | set(cfg["prompts"].get("eval") or [])
    for kind, sec in cfg["processes"].items():
        if not sec["model"].get("checkpoint"):
            raise TaskError(f"processes.{kind}.model.checkpoint must name the base network (tiny profile)")
        net = sec["model"]["net"]
        classes = len(net.get("prompts") or ()) if sec["model"]["arch"] == "text_unet" \
            else int(net.get("num_classes") or 0)
        if classes and max(ids) >= classes:
            raise TaskError(f"prompt id {max(ids)} is not a class of processes.{kind}.model "
                            f"(num_classes {classes}: ids 0..{classes - 1})")


def _method_entry(mid: str, entry) -> None:
    reg = registry.load_all()
    if mid not in reg:
        raise TaskError(f"methods: unknown method {mid!r}{did_you_mean(mid, reg)}; "
                        f"choose from {', '.join(sorted(reg))}")
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise TaskError(f"methods.{mid} must map hyperparameters to values, got {_show(entry)}")
    m = reg[mid]()
    m.validate_hparams({**m.defaults, **entry}, where=f"methods.{mid}")

"""Tasks: `tasks/<name>.yaml` (omegaconf) → a fully resolved config, and builders from it.

Schema (see tasks/gmm.yaml for a complete example):
    name, title, alpha                 the objective J = E[r] − α·KL
    base: NAME                         optional: start from tasks/NAME.yaml and override (a ``reward``
                                       section replaces the base's instead of merging into it)
    data: {source, module?, cfg}       pretraining data (rsmbench.data.sources registry; `module` is imported)
    processes.<diffusion|flow>:        process kwargs, base model (arch, net kwargs, checkpoint), pretrain
    reward: {name, cfg}                rewards.get(name, **cfg)
    prompts: {names, train, eval}      integer class ids (names for display); ``${prompt_list:a,b}``
                                       reads tasks/prompts/a.txt then b.txt (one prompt a line,
                                       an optional ``category<TAB>`` prefix dropped)
    train, budget, eval, bench         loop hyperparameters, reward-query budget, pinned eval protocol
    methods.<id>: {...}                per-method hyperparameter overrides
    profiles.<tiny|sd15|sd35>: {...}   overrides applied by --profile (tiny = the file as written)

Errors a user can cause raise ``TaskError`` with one line that names the valid choices.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import rewards
from rsmbench.core.checkpoints import load_checkpoint
from rsmbench.core.params import _show
from rsmbench.core.process import PREDICTION, make_process
from rsmbench.data import gmm
from rsmbench.errors import CheckpointError, TaskError
from rsmbench.run import schema

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("tiny", "sd15", "sd35")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def prompt_list(*names: str) -> list[str]:
    """The prompts of tasks/prompts/<name>.txt, concatenated (``${prompt_list:a,b}`` in a task file)."""
    out = []
    for name in names:
        path = ROOT / "tasks" / "prompts" / f"{name}.txt"
        if not path.is_file():
            raise TaskError(f"prompt list {name!r} not found ({path})")
        out += [line.rpartition("\t")[2].strip() for line in path.read_text().splitlines() if line.strip()]
    return out


OmegaConf.register_resolver("prompt_list", prompt_list, replace=True)


def tasks_dir() -> Path:
    return Path(os.environ.get("RSMBENCH_TASKS", ROOT / "tasks"))


def available() -> list[str]:
    """The task names (files starting with ``_`` are bases that other tasks extend, not tasks)."""
    return sorted(p.stem for p in tasks_dir().glob("*.yaml") if not p.stem.startswith("_"))


def resolve_path(p: str | os.PathLike) -> Path:
    """Relative paths in task files are relative to the repository root."""
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


def _read(name: str, seen=()) -> DictConfig:
    path = tasks_dir() / f"{name}.yaml"
    if not path.is_file():
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(available()) or '(none)'}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # malformed YAML
        raise TaskError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise TaskError(f"{path}: a task file is a mapping of sections, got a list")
    base = cfg.pop("base", None)
    if base:
        if base in seen:
            raise TaskError(f"task {name!r}: circular 'base' chain {' -> '.join(seen + (name, base))}")
        parent = _read(base, seen + (name,))
        try:
            _replace_rewards(parent, cfg)
            cfg = OmegaConf.merge(parent, cfg)
        except (OmegaConfBaseException, TypeError) as e:  # e.g. a list where the base has a section
            why = _misfit(OmegaConf.to_container(parent), OmegaConf.to_container(cfg)) or str(e).splitlines()[0]
            raise TaskError(f"task {name!r} does not fit its base {base!r}: {why}") from None
    return cfg


def _misfit(parent: dict, child: dict, where: str = "") -> str:
    """The first key where `child` has a value of another shape (mapping, list, scalar) than `parent`."""
    def shape(v):
        return "a mapping" if isinstance(v, dict) else "a list" if isinstance(v, list) else "a value"

    for key, v in child.items():
        if key not in parent or parent[key] is None or v is None:
            continue
        dotted = f"{where}.{key}" if where else str(key)
        if shape(parent[key]) != shape(v):
            return f"{dotted} must be {shape(parent[key])} as in the base, got {_show(v)}"
        if isinstance(v, dict) and (why := _misfit(parent[key], v, dotted)):
            return why
    return ""


def _replace_rewards(parent: DictConfig, child: DictConfig) -> None:
    """A task that names a reward replaces its base's reward section (top level and per profile)
    instead of merging into it: the arguments of one reward mean nothing to another."""
    if "reward" in child and "reward" in parent:
        parent.reward = None
    for prof, sub in (child.get("profiles") or {}).items():
        if sub is not None and "reward" in sub and prof in (parent.get("profiles") or {}) \
                and "reward" in parent.profiles[prof]:
            parent.profiles[prof].reward = None


def parse_overrides(overrides) -> list[str]:
    out = []
    for o in overrides or ():
        key, eq, _ = o.partition("=")
        if not eq or not key.strip() or any(c.isspace() for c in key):
            raise TaskError(f"malformed override {o!r}; write key=value, e.g. train.lr=1e-3")
        out.append(o)
    return out


def full_scale_profiles(name: str) -> list[str]:
    """The full-scale profiles (sd15, sd35) a task file declares, in PROFILES order."""
    declared = _read(name).get("profiles") or {}
    return [p for p in PROFILES if p != "tiny" and p in declared]


def load(name: str, overrides=(), profile: str = "tiny") -> DictConfig:
    """Task name → resolved config, with the profile overlay and dotlist overrides applied."""
    if profile not in PROFILES:
        raise TaskError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    cfg = _read(name)
    profiles = cfg.pop("profiles", None) or {}
    if profile != "tiny":
        if profile not in profiles:
            raise TaskError(f"task {name!r} has no {profile!r} profile; choose from "
                            f"{', '.join(['tiny', *profiles])}")
        try:
            cfg = OmegaConf.merge(cfg, profiles[profile])
        except OmegaConfBaseException as e:
            raise TaskError(f"task {name!r}: bad {profile!r} profile: {str(e).splitlines()[0]}") from None
    cfg.profile = profile
    if "methods" not in cfg or cfg.methods is None:
        cfg.methods = {}
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.methods, False)  # any method id / hyperparameter may be overridden
    dotlist = parse_overrides(overrides)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        OmegaConf.resolve(cfg)
    except TaskError:
        raise
    except OmegaConfBaseException as e:
        _explain_override(cfg, dotlist, name)  # an unknown key: the schema names the valid ones
        raise TaskError(f"bad override for task {name!r}: {str(e).splitlines()[0]}") from None
    validate(cfg, name)
    return cfg


def _explain_override(cfg: DictConfig, dotlist: list[str], name: str) -> None:
    """Merge the overrides without struct mode and validate: a key the schema does not declare is
    then its one-line error ('did you mean', the valid keys); returns where the schema accepts it."""
    try:
        loose = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(cfg)), OmegaConf.from_dotlist(dotlist))
        plain = OmegaConf.to_container(loose, resolve=True)
    except OmegaConfBaseException:
        return
    schema.validate(plain, name)


def validate(cfg: DictConfig, name: str | None = None) -> None:
    """Every value of a merged task config against ``rsmbench.run.schema`` (types, ranges, relations,
    each method's declared hyperparameters); raises ``TaskError`` (one line)."""
    schema.validate(OmegaConf.to_container(cfg, resolve=True), name)


# ---- builders: from a task config, or from the plain sections of a run spec ---------------------------
def _plain(section):
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section


def sample_shape(model) -> tuple:
    """One sample's shape from a ``processes.<kind>.model`` section."""
    model = _plain(model)
    net = model["net"]
    if model["arch"] == "mlp":
        return (int(net.get("dim", 2)),)
    return (int(net.get("channels", 3)), int(net.get("sample_size", 16)), int(net.get("sample_size", 16)))


def build_process(cfg: DictConfig, kind: str):
    return make_process(kind, **OmegaConf.to_container(cfg.processes[kind].process, resolve=True))


def reward_kwargs(cfg: DictConfig) -> dict:
    """The reward's keyword arguments: ``reward.cfg`` as a dict ({} when absent, null or empty)."""
    return _plain(cfg.reward).get("cfg") or {}


def make_reward(reward) -> object:
    """The reward of a ``reward: {name, cfg}`` section."""
    reward = _plain(reward)
    try:
        return rewards.get(reward["name"], **(reward.get("cfg") or {}))
    except KeyError as e:
        raise TaskError(str(e).strip("'\"")) from None
    except (TypeError, ValueError) as e:  # reward.cfg the reward does not take
        raise TaskError(f"reward {reward['name']!r}: bad reward.cfg: {str(e).splitlines()[0]}") from None


def build_reward(cfg: DictConfig):
    return make_reward(cfg.reward)


def base_network(model, task: str, dtype):
    """The committed base network of a ``processes.<kind>.model`` section (hash-checked), in `dtype`."""
    net, _ = load_checkpoint(resolve_path(_plain(model)["checkpoint"]), task=task)
    return net.to(dtype)


def check_base(cfg: DictConfig, kind: str) -> None:
    """The base checkpoint of process `kind` loads (hash-checked) and predicts the output the process
    samples with (ε for diffusion, v for flow); else ``CheckpointError``."""
    path = resolve_path(cfg.processes[kind].model.checkpoint)
    _, meta = load_checkpoint(path, task=cfg.name)
    if meta.get("prediction") != PREDICTION[kind]:
        raise CheckpointError(f"checkpoint {path} is a {meta.get('prediction')!r}-prediction network; the {kind} "
                              f"process samples with {PREDICTION[kind]!r} (processes.{kind}.model.checkpoint)")
    model = _plain(cfg.processes[kind].model)  # the network is the checkpoint's: a different one is not honoured
    for key, want, got in [("arch", model["arch"], meta.get("arch")),
                           *((f"net.{k}", v, (meta.get("net") or {}).get(k)) for k, v in model["net"].items())]:
        if want != got:
            raise CheckpointError(f"processes.{kind}.model.{key} is {want!r} but the base checkpoint {path} has "
                                  f"{got!r}; run `rsmbench pretrain --task {cfg.name}` with it, or leave it unset")


def load_base(cfg: DictConfig, kind: str, dtype=None):
    """The committed base network of process `kind` (hash-checked), in the training dtype."""
    return base_network(cfg.processes[kind].model, cfg.name, dtype or DTYPES[cfg.train.dtype])


def exact_optimum(data, reward, alpha):
    """The exact optimum of a Gaussian-mixture task from its ``data:`` section (None for other tasks)."""
    data = _plain(data)
    if data is None or data.get("source") != "gmm" or not hasattr(reward, "tilt"):
        return None
    return gmm.GroundTruth(gmm.MixtureData(**data["cfg"]).mixture, reward, float(alpha))


def ground_truth(cfg: DictConfig, reward):
    """Exact optimum of a Gaussian-mixture task (None for tasks without one)."""
    return exact_optimum(cfg.get("data"), reward, cfg.get("alpha"))

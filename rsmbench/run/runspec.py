"""The run spec: the one description of a run, built from a task config, hashed, logged, and the only
input of ``train.train_run``.

A run is method × formulation × process × seed on a task. Its spec is a plain JSON-able dict of
everything the run executes, so that two runs with the same hash do the same computation:

    task, profile, method, formulation, process, seed   identity
    hp                       the method's resolved hyperparameters (defaults, preset, task overrides)
    budget                   {mode, reward_queries}
    train, eval, alpha       the loop's hyperparameters, the pinned eval protocol, the KL weight of J
    reward, prompts, data    the reward model (evaluation, and training unless train_reward), the prompt
                             ids/names, the pretraining data (ground truth)
    train_reward             (only where the task has ``reward_first_order``, a differentiable form of a
                             black-box reward) a first-order method's training reward
    process_kwargs, model    the sampler grid and the base network, with the checkpoint's sha256
    fullscale                (full-scale profiles) the SD model and the profile's settings

The checkpoint's sha256 (from its sidecar, which ``load_checkpoint`` verifies against the file) is part
of the spec, so a re-pretrained base model, like a changed ``data:`` section, is a new run.
"""
from __future__ import annotations

import hashlib
import json

from omegaconf import OmegaConf

from rsmbench.core import method as registry
from rsmbench.core.checkpoints import checkpoint_sha256
from rsmbench.core.params import Param
from rsmbench.run import tasks


def method_hparams(task_cfg, m) -> dict:
    """The method's hyperparameters: its defaults, updated by the task's ``methods.<id>`` entry."""
    over = task_cfg.methods.get(m.id) if task_cfg.get("methods") else None
    return m.hparams(**(OmegaConf.to_container(over, resolve=True) if over else {}))


def eval_spec(task_cfg, kind: str) -> dict:
    """The part of a run spec that the pinned evaluation of process `kind` depends on: the base
    model's own eval is a function of this alone (and every run spec of the task contains it)."""
    cfg = OmegaConf.to_container(task_cfg, resolve=True)
    spec = {"task": cfg["name"], "profile": cfg.get("profile", "tiny"), "process": kind,
            "train": {k: cfg["train"][k] for k in ("dtype", "cfg_scale")}, "eval": cfg["eval"],
            "alpha": cfg.get("alpha"), "reward": cfg["reward"], "prompts": cfg["prompts"], "data": cfg.get("data"),
            "process_kwargs": cfg["processes"][kind]["process"], "model": dict(cfg["processes"][kind]["model"])}
    if spec["profile"] == "tiny":
        path = tasks.resolve_path(spec["model"]["checkpoint"])
        spec["model"]["checkpoint_sha256"] = checkpoint_sha256(path, task=spec["task"])
    else:  # full scale: the SD model and the profile's settings replace the tiny net
        spec["process_kwargs"] = {}
        spec["model"] = {"name": cfg.get("model"), "profile": cfg["fullscale"]["profile"]}
        spec["fullscale"] = cfg["fullscale"]
    return spec


def run_spec(task_cfg, method_id: str, formulation: str, kind: str, seed: int,
             budget_mode: str | None = None, tuned: dict | None = None) -> dict:
    """The spec of one run (see the module docstring). `tuned`: the method's tuned values
    ({"lr": …, "hp": {…}}, ``rsmbench.run.tuning``), applied over the task's and recorded as ``tuned``."""
    m = registry.get(method_id)
    hp = method_hparams(task_cfg, m)
    if tuned:
        hp = m.validate_hparams({**hp, **tuned.get("hp", {})}, where=f"tuned {method_id}")
        if "lr" in tuned:
            Param(1.0, gt=0).check(tuned["lr"], f"tuned {method_id} lr")
    budget = OmegaConf.to_container(task_cfg.budget, resolve=True)
    mode = budget_mode or budget.get("mode", "matched")
    queries = int(budget["reward_queries"])
    if mode == "published" and "budget_reward_queries" in hp:
        queries = int(hp["budget_reward_queries"])
    spec = eval_spec(task_cfg, kind)
    spec.update(method=method_id, formulation=formulation, seed=int(seed), hp=hp,
                budget={"mode": mode, "reward_queries": queries},
                train=OmegaConf.to_container(task_cfg.train, resolve=True),
                divergence=OmegaConf.to_container(task_cfg.divergence, resolve=True)
                if task_cfg.get("divergence") is not None else None)
    if m.order == "first" and task_cfg.get("reward_first_order") is not None:
        spec["train_reward"] = OmegaConf.to_container(task_cfg.reward_first_order, resolve=True)
    if tuned:
        if "lr" in tuned:
            spec["train"]["lr"] = float(tuned["lr"])
        spec["tuned"] = tuned
    return spec


def run_name(spec: dict) -> str:
    return f"{spec['method']}-{spec['formulation']}-{spec['process']}-s{spec['seed']}"


def config_hash(spec: dict) -> str:
    """The run's identity: sha256 of its spec (sorted JSON), 20 hex digits."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def group_hash(spec: dict) -> str:
    """The configuration's identity: the hash of the spec without its seed (the runs that differ only
    in the seed are the seeds of one configuration, one row of a table)."""
    return config_hash({k: v for k, v in spec.items() if k != "seed"})

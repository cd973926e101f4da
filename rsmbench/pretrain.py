"""Base-model pretraining, reproducible from the task file, and hash-checked checkpoints.

Objectives (one step on a data batch x0, ε ~ N(0, I)):
- ``flow_matching`` (v-prediction; Lipman et al. 2023, arXiv 2210.02747; rectified flow, Liu et al.
  2023, arXiv 2209.03003): t ~ U(0, 1), x_t = (1−t)·x0 + t·ε, loss ⟨(v_θ(x_t, t·T) − (ε − x0))²⟩,
  with the diffusers convention of ``rsmbench.process.FlowProcess`` (model time σ·T).
- ``epsilon`` (DDPM denoising score matching; Ho et al. 2020, arXiv 2006.11239, Eq. 14): t ~ U{0..T−1},
  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε on the task's own scheduler, loss ⟨(ε_θ(x_t, t) − ε)²⟩.
AdamW, an EMA of the weights (the EMA is what is saved), one fixed seed for everything.

Data sources register with ``@register_data(name)``: a factory(**cfg) → object with
``sample(n, generator) -> (x0 (n, *shape), cond (n,) long or None)``. A task may name a
``data.module`` to import (where its source registers); ``gmm`` lives in ``rsmbench.gmm``.

Checkpoints: ``<name>.safetensors`` plus ``<name>.json`` holding the config and the sha256 of the
safetensors file; ``load_checkpoint`` refuses a missing or mismatching file with one line naming
the fix (``rsmbench pretrain --task NAME``).
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rsmbench.models import build_net

DATA_SOURCES: dict = {}


def register_data(name: str):
    def deco(factory):
        DATA_SOURCES[name] = factory
        return factory
    return deco


@register_data("gmm")
def _gmm_source(**cfg):
    from rsmbench.gmm import MixtureData

    return MixtureData(**cfg)


def data_source(name: str, module: str | None = None, **cfg):
    if module:
        importlib.import_module(module)
    if name not in DATA_SOURCES:
        raise KeyError(f"unknown data source {name!r}; choose from {', '.join(sorted(DATA_SOURCES))}")
    return DATA_SOURCES[name](**cfg)


class CheckpointError(RuntimeError):
    """A missing or corrupt base checkpoint: one line naming the fix."""


# ---- checkpoints ---------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(net: torch.nn.Module, path, config: dict) -> str:
    """Write net's weights (safetensors) and a JSON sidecar with `config` and the file's sha256.
    `config` must hold arch, prediction and net (the build_net kwargs). Returns the hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    digest = sha256(path)
    meta = {"format": "rsmbench-checkpoint-1", "file": path.name, "sha256": digest, "config": config}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return digest


def load_checkpoint(path, task: str | None = None):
    """(net, config) from a checkpoint written by ``save_checkpoint``, after checking its hash."""
    path = Path(path)
    fix = f"run `rsmbench pretrain --task {task}`" if task else "run `rsmbench pretrain --task NAME`"
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"missing base checkpoint {path} (or its .json); {fix}")
    meta = json.loads(meta_path.read_text())
    if sha256(path) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} does not match the sha256 in {meta_path.name} "
                              f"(corrupt or edited); {fix}")
    cfg = meta["config"]
    net = build_net(cfg["arch"], cfg["prediction"], dtype=torch.float32, **cfg["net"])
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net, cfg


# ---- training ------------------------------------------------------------------------------------
def pretrain(task_cfg, kind: str, log=print) -> tuple[torch.nn.Module, dict]:
    """Train the base model of process `kind` of a task from scratch; returns (EMA net, config)."""
    from omegaconf import OmegaConf

    from rsmbench.tasks import build_process

    pc = task_cfg.processes[kind]
    hp = OmegaConf.to_container(pc.pretrain, resolve=True)
    process = build_process(task_cfg, kind)
    data_cfg = OmegaConf.to_container(task_cfg.data, resolve=True)
    data = data_source(data_cfg["source"], data_cfg.get("module"), **(data_cfg.get("cfg") or {}))
    net_kw = OmegaConf.to_container(pc.model.net, resolve=True)
    torch.manual_seed(hp["seed"])
    net = build_net(pc.model.arch, process.prediction, seed=hp["seed"], **net_kw)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, hp["steps"])
    gen = torch.Generator().manual_seed(hp["seed"])
    objective = hp["objective"]
    if objective == "flow_matching":
        T = float(process.scheduler.config.num_train_timesteps)
    elif objective == "epsilon":
        acp = process.scheduler.alphas_cumprod.double()
        T = len(acp)
    else:
        raise ValueError(f"unknown pretraining objective {objective!r}; choose flow_matching or epsilon")
    t0 = time.time()
    for step in range(hp["steps"]):
        x0, cond = data.sample(hp["batch"], gen)
        x0 = x0.float()
        eps = torch.randn(x0.shape, generator=gen)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if objective == "flow_matching":
            t = torch.rand(len(x0), generator=gen)
            xt = (1 - t.view(shape)) * x0 + t.view(shape) * eps
            pred, target = net(xt, t * T, cond), eps - x0
        else:
            ti = torch.randint(0, T, (len(x0),), generator=gen)
            ab = acp[ti].float().view(shape)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            pred, target = net(xt, ti.float(), cond), eps
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - hp["ema"])
        if log and (step + 1) % max(1, hp["steps"] // 5) == 0:
            log(f"  [{kind}] step {step + 1}/{hp['steps']} loss {loss.item():.4f} ({time.time() - t0:.1f} s)")
    config = {"task": str(task_cfg.name), "process": kind, "arch": str(pc.model.arch),
              "prediction": process.prediction, "net": net_kw, "pretrain": hp, "data": data_cfg,
              "process_kwargs": OmegaConf.to_container(pc.process, resolve=True),
              "torch": torch.__version__, "train_seconds": round(time.time() - t0, 1)}
    ema.prediction = process.prediction
    return ema.eval(), config


# ---- command line ----------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("pretrain", help="train a task's tiny base models (fixed seed) and save the checkpoints")
    p.add_argument("--task", required=True)
    p.add_argument("--process", default="all", help="comma-separated processes (default: all of the task's)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(run=_run)


def _run(args) -> int:
    from rsmbench import tasks
    from rsmbench.cli import UsageError

    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        cfg = tasks.load(args.task, args.overrides)
    except tasks.TaskError as e:
        raise UsageError(str(e))
    kinds = list(cfg.processes) if args.process == "all" else args.process.split(",")
    bad = [k for k in kinds if k not in cfg.processes]
    if bad:
        raise UsageError(f"task {args.task!r} has no process {bad[0]!r}; choose from {', '.join(cfg.processes)}")
    for kind in kinds:
        net, config = pretrain(cfg, kind)
        path = tasks.resolve_path(cfg.processes[kind].model.checkpoint)
        digest = save_checkpoint(net, path, config)
        print(f"{kind}: wrote {path} (sha256 {digest[:16]}…, {path.stat().st_size / 1e3:.0f} kB, "
              f"{config['train_seconds']} s)")
        gt = _quality(cfg, kind, net)
        if gt:
            print(f"{kind}: {gt}")
    return 0


def _quality(cfg, kind, net) -> str:
    """A one-line sample-quality check of a fresh checkpoint (gmm: SW distance to the mixture)."""
    from rsmbench import tasks
    from rsmbench.models import Policy
    from rsmbench.rollout import generators, sample

    reward = tasks.build_reward(cfg)
    gt = tasks.ground_truth(cfg, reward)
    if gt is None:
        return ""
    from rsmbench.gmm import sliced_wasserstein

    process = tasks.build_process(cfg, kind)
    x = sample(Policy(net, process), (gt.ref.dim,), generators(range(2048))).final
    ref = gt.ref.sample(2048, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(gt.ref.sample(2048, torch.Generator().manual_seed(2)), ref)
    return (f"sliced W2 to the mixture {sliced_wasserstein(x, ref):.3f} (floor {floor:.3f}); "
            f"E[r] {reward(x.double()).mean():.3f} (exact {reward(ref.double()).mean():.3f})")


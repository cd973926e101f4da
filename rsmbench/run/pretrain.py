"""Base-model pretraining, reproducible from the task file (``rsmbench pretrain --task NAME``).

Objectives (one step on a data batch x0, ε ~ N(0, I)):
- ``flow_matching`` (v-prediction; Lipman et al. 2023, arXiv 2210.02747; rectified flow, Liu et al.
  2023, arXiv 2209.03003): t ~ U(0, 1), x_t = (1−t)·x0 + t·ε, loss ⟨(v_θ(x_t, t·T) − (ε − x0))²⟩,
  with the diffusers convention of ``rsmbench.core.process.FlowProcess`` (model time σ·T).
- ``epsilon`` (DDPM denoising score matching; Ho et al. 2020, arXiv 2006.11239, Eq. 14): t ~ U{0..T−1},
  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε on the task's own scheduler, loss ⟨(ε_θ(x_t, t) − ε)²⟩.
- ``v`` (the same x_t, for a net with a ``v_head``; Salimans & Ho 2022, arXiv 2202.00512, §4): loss
  ⟨(v_θ(x_t, t) − v)²⟩ on the head's inner output, v = √ᾱ_t·ε − √(1−ᾱ_t)·x0. It equals the ε loss
  weighted by 1/ᾱ_t (ε̂ − ε = √ᾱ_t·(v̂ − v)), so the high-noise steps are not down-weighted.
AdamW, an EMA of the weights (the EMA is what is saved), one fixed seed for everything. With
``cond_dropout: p`` each sample's prompt id is replaced by the null prompt (id ``num_classes``) with
probability p, so classifier-free guidance is trained in (Ho & Salimans 2022, arXiv 2207.12598, §3.2).

The data come from the task's ``data:`` source (``rsmbench.data.sources``); the result is written
with ``rsmbench.core.checkpoints.save_checkpoint`` (safetensors + a JSON sidecar with its sha256).
"""
from __future__ import annotations

import copy
import time

import torch
from omegaconf import OmegaConf

from rsmbench.core.checkpoints import save_checkpoint
from rsmbench.core.models import Policy, build_net
from rsmbench.core.rollout import generators, sample
from rsmbench.data.gmm import sliced_wasserstein
from rsmbench.data.sources import data_source
from rsmbench.errors import TaskError
from rsmbench.run import tasks


# ---- training ------------------------------------------------------------------------------------
def pretrain(task_cfg, kind: str, log=print) -> tuple[torch.nn.Module, dict]:
    """Train the base model of process `kind` of a task from scratch; returns (EMA net, config)."""
    pc = task_cfg.processes[kind]
    hp = OmegaConf.to_container(pc.pretrain, resolve=True)
    process = tasks.build_process(task_cfg, kind)
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
    elif objective in ("epsilon", "v"):
        acp = process.scheduler.alphas_cumprod.double()
        T = len(acp)
    else:
        raise ValueError(f"unknown pretraining objective {objective!r}; choose flow_matching, epsilon or v")
    t0 = time.time()
    for step in range(hp["steps"]):
        x0, cond = data.sample(hp["batch"], gen)
        x0 = x0.float()
        if hp.get("cond_dropout"):  # CFG's null prompt
            drop = torch.rand(len(cond), generator=gen) < hp["cond_dropout"]
            cond = torch.where(drop, torch.full_like(cond, net.num_classes), cond)
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
            if objective == "v":
                pred, target = net.velocity(xt, ti.float(), cond), ab.sqrt() * eps - (1 - ab).sqrt() * x0
            else:
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
    p.add_argument("--task", required=True, help="a task of tasks/ (rsmbench list tasks)")
    p.add_argument("--process", default="all", help="comma-separated processes (default: all of the task's)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(run=_run)


def _run(args) -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = tasks.load(args.task, args.overrides)
    kinds = list(cfg.processes) if args.process == "all" else args.process.split(",")
    bad = [k for k in kinds if k not in cfg.processes]
    if bad:
        raise TaskError(f"task {args.task!r} has no process {bad[0]!r}; choose from {', '.join(cfg.processes)}")
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
    reward = tasks.build_reward(cfg)
    gt = tasks.ground_truth(cfg, reward)
    if gt is None:
        return ""
    process = tasks.build_process(cfg, kind)
    x = sample(Policy(net, process), (gt.ref.dim,), generators(range(2048))).final
    ref = gt.ref.sample(2048, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(gt.ref.sample(2048, torch.Generator().manual_seed(2)), ref)
    return (f"sliced W2 to the mixture {sliced_wasserstein(x, ref):.3f} (floor {floor:.3f}); "
            f"E[r] {reward(x.double()).mean():.3f} (exact {reward(ref.double()).mean():.3f})")


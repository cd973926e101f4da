"""One training loop for every method and both formulations, with the pinned evaluation.

Per iteration k (CleanRL-style, hyperparameters in the task file):
    θ† = frozen copy of θ                                   (models.frozen_copy)
    batch = method.collect(ctx, cond, seeds); method.prepare(batch, ctx)
    repeat train.inner_updates times:
        loss = method.original_loss(batch, ctx)              formulation 'original'
             | rsm.rsm_loss(θ, ref, method.rsm_spec(batch, ctx))   formulation 'rsm'
        AdamW step after clipping the gradient norm
until the reward-query budget is spent. Full-scale profiles (sd15 / sd35, ``_full_setup``): θ is the
peft LoRA of the SD model built by ``rsmbench.run.fullscale.build``, the reference is the adapter
disabled, θ† a LoRA snapshot (``sync_behaviour`` before each collection; the base is never copied),
prompts are drawn from the task's prompt list each iteration, the loss gradient is accumulated over
chunks of ``train.micro_rows`` rows, and checkpoints hold the LoRA tensors only. Reward queries and
network evaluations (NFEs) are counted generically by wrapping the reward and the three policies, so
every method is accounted alike.

Evaluation (task ``eval`` section, logged with the run): fixed held-out seeds and prompts, the
trained sampler; reward mean/std; path KL to the reference Σ_i KL_i in nats (D·⟨·⟩ per step, along
θ's own trajectories); diversity = mean pairwise feature distance; prior preservation = Fréchet
distance between the features of θ's and the base model's samples on the same seeds. Tasks with an
exact optimum (``gmm``) add J = E[r] − α·KL, the gaps to J*, and sliced-W2 to exact target samples.

Resumability: every ``checkpoint_every`` iterations the net, the optimizer, the counters and the
not-yet-logged metrics are written atomically; metrics are logged to MLflow only after the
checkpoint that contains them, and a resumed run logs only steps beyond the last logged one, so a
run killed anywhere has neither a gap nor a duplicate in its metric history.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from rsmbench.core import design, rsm
from rsmbench.core import method as registry
from rsmbench.core.method import Context
from rsmbench.core.models import Policy, frozen_copy
from rsmbench.core.rollout import generators, sample
from rsmbench.run import fullscale, tasks

FORMULATIONS = ("rsm", "original")


class NonFiniteError(RuntimeError):
    """A NaN or inf in a reward or a loss: the run stops with a failed status."""


# ---- generic accounting ---------------------------------------------------------------------------
@dataclass
class Counters:
    reward_queries: int = 0
    nfe: int = 0
    wall_time: float = 0.0


class CountingPolicy(Policy):
    """A Policy that adds its network evaluations (samples × CFG branches) to a counter."""

    def __init__(self, net, process, cfg_scale, counters: Counters):
        super().__init__(net, process, cfg_scale)
        self.counters = counters

    def __call__(self, x, i, cond=None):
        self.counters.nfe += x.shape[0] * (2 if cond is not None and self.cfg_scale != 1.0 else 1)
        return super().__call__(x, i, cond)


class CountingReward:
    """Forwards to a reward and counts its queries (one per sample)."""

    def __init__(self, reward, counters: Counters):
        self._reward, self.counters = reward, counters

    def __call__(self, x, cond=None):
        self.counters.reward_queries += x.shape[0]
        return self._reward(x, cond)

    def __getattr__(self, name):
        return getattr(self._reward, name)


# ---- the run's resolved configuration --------------------------------------------------------------
def method_hparams(task_cfg, m) -> dict:
    over = task_cfg.methods.get(m.id) if task_cfg.get("methods") else None
    return m.hparams(**(OmegaConf.to_container(over, resolve=True) if over else {}))


def run_config(task_cfg, method_id: str, formulation: str, kind: str, seed: int,
               budget_mode: str | None = None) -> dict:
    """The fully resolved config of one run (what is hashed, logged as params and as an artifact)."""
    m = registry.get(method_id)
    cfg = OmegaConf.to_container(task_cfg, resolve=True)
    hp = method_hparams(task_cfg, m)
    mode = budget_mode or cfg["budget"].get("mode", "matched")
    budget = int(cfg["budget"]["reward_queries"])
    if mode == "published" and "budget_reward_queries" in hp:
        budget = int(hp["budget_reward_queries"])
    rc = {"task": cfg["name"], "profile": cfg.get("profile", "tiny"), "method": method_id,
          "formulation": formulation, "process": kind, "seed": int(seed),
          "hp": hp, "budget": {"mode": mode, "reward_queries": budget},
          "train": cfg["train"], "eval": cfg["eval"], "alpha": cfg.get("alpha"),
          "reward": cfg["reward"], "prompts": cfg["prompts"],
          "process_kwargs": cfg["processes"][kind]["process"], "model": cfg["processes"][kind]["model"]}
    if rc["profile"] != "tiny":  # full scale: the SD model and the profile's settings replace the tiny net
        rc["process_kwargs"] = {}
        rc["model"] = {"name": cfg.get("model"), "profile": cfg["fullscale"]["profile"]}
        rc["fullscale"] = cfg["fullscale"]
    return rc


# ---- evaluation ------------------------------------------------------------------------------------
def _features(reward, x):
    f = reward.features(x) if hasattr(reward, "features") else x
    return f.detach().double().reshape(len(f), -1)


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (the FID formula)
    ‖μ1 − μ2‖² + Tr C1 + Tr C2 − 2·Tr (C1·C2)^½.

    With Cj = Xjᵀ·Xj/(nj − 1) (Xj the centred features), the eigenvalues of C1·C2 are the squared
    singular values of X1·X2ᵀ/√((n1−1)(n2−1)), so Tr (C1·C2)^½ is that matrix's nuclear norm: an
    n1×n2 SVD instead of a d×d matrix square root (exact; 1280-d features cost ms, not seconds).
    With thin SVDs Xj = Uj·Sj·Vjᵀ that nuclear norm is ‖S1·V1ᵀ·V2·S2‖_* (a min(n, d)-sized matrix),
    so many samples of few features never form the n1×n2 product."""
    a, b = f1.double().numpy(), f2.double().numpy()
    a_c, b_c = a - a.mean(0), b - b.mean(0)
    n1, n2 = len(a), len(b)
    tr1, tr2 = (a_c**2).sum() / (n1 - 1), (b_c**2).sum() / (n2 - 1)
    _, s1, v1 = np.linalg.svd(a_c, full_matrices=False)
    _, s2, v2 = np.linalg.svd(b_c, full_matrices=False)
    m = (s1[:, None] * v1) @ (v2.T * s2[None, :])
    cross = np.linalg.svd(m, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + tr1 + tr2 - 2 * cross)


def diversity(f: torch.Tensor, max_n: int = 512) -> float:
    """Mean pairwise Euclidean feature distance (first max_n samples)."""
    f = f[:max_n]
    n = len(f)
    return float(torch.cdist(f, f).sum() / (n * (n - 1))) if n > 1 else float("nan")


class Evaluator:
    """The pinned eval protocol of a task on one process; base samples computed once (and shared by
    the runs of one bench process, ``_tiny_setup``)."""

    def __init__(self, task_cfg, process, ref: Policy, reward, shape, gt=None):
        ev = task_cfg.eval
        self.process, self.ref, self.reward, self.shape, self.gt = process, ref, reward, shape, gt
        self.prompts = torch.tensor(list(ev.prompts))
        n = int(ev.num_samples)
        self.cond = self.prompts.repeat_interleave(math.ceil(n / len(self.prompts)))[:n]
        self.seeds = [int(ev.seed_start) + b for b in range(n)]
        self.stochastic = None if ev.sampler == "sde" else torch.zeros(process.num_steps, dtype=torch.bool)
        self.path_kl = bool(ev.get("path_kl", True)) and ev.sampler == "sde"
        self.dim = int(np.prod(shape))
        self.base = self._sample(ref)
        self.base_feat = _features(reward, self.base.final)
        self.base_extra = {}
        if gt is not None:  # J* = α·log E_base[exp(r/α)]: log-mean-exp over ``jstar_samples`` base samples
            n_star = int(ev.get("jstar_samples") or 0)
            more = [self._sample(ref, range(n + k, min(n + k + 8192, n_star))).final
                    for k in range(0, n_star - n, 8192)]
            self.base_extra = gt.base_metrics(torch.cat([self.base.final, *more]))

    def _sample(self, policy, index=None):
        """Samples of the eval seeds (``index``: further seeds seed_start + k, prompts cycled alike)."""
        seeds, cond = self.seeds, self.cond
        if index is not None:
            seeds = [self.seeds[0] + k for k in index]
            per_prompt = math.ceil(len(self.cond) / len(self.prompts))
            cond = self.prompts[torch.tensor(list(index)) // per_prompt % len(self.prompts)]
        cond = cond if getattr(policy.net, "num_classes", 0) else None
        return sample(policy, self.shape, generators(seeds), cond=cond, stochastic=self.stochastic,
                      dtype=next(policy.net.parameters()).dtype)

    @torch.no_grad()
    def kl_to_ref(self, ro) -> torch.Tensor:
        """Per-sample path KL Σ_i D·⟨(μ_θ − μ_ref)²⟩/(2σ_i²) along θ's trajectories (nats)."""
        total = torch.zeros(ro.batch_size, dtype=torch.float64)
        for j, i in enumerate(ro.steps.tolist()):
            x = ro.states[:, j]
            mu_ref = self.process.mean(x, self.ref(x, i, ro.cond), i)
            total += self.dim * self.process.kl(ro.means[:, j], mu_ref, i).double()
        return total

    @torch.no_grad()
    def __call__(self, policy, at_base: bool = False) -> tuple[dict, torch.Tensor]:
        """Eval metrics of `policy` and its final samples. ``at_base``: the caller guarantees that
        θ = the base model (iteration 0), whose samples on the pinned seeds are already ``self.base``."""
        ro = self.base if at_base else self._sample(policy)
        x = ro.final
        r = self.reward(x, ro.cond).detach().double()
        feat = _features(self.reward, x)
        out = {"eval/reward_mean": r.mean().item(), "eval/reward_std": r.std().item(),
               "eval/diversity": diversity(feat), "eval/prior_frechet": frechet(feat, self.base_feat)}
        if self.path_kl:
            out["eval/kl_ref"] = self.kl_to_ref(ro).mean().item()
        if self.gt is not None:
            gm = self.gt.run_metrics(x, out["eval/reward_mean"], out.get("eval/kl_ref", 0.0),
                                     self.base_extra["J_star_model"])
            out.update({f"eval/{k}": v for k, v in gm.items()})
        return out, x


def plot_samples(path: Path, x: torch.Tensor, title: str, base=None, target=None) -> None:
    """A PNG of the eval samples: a scatter plot for 2-D data, an image grid otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu()
    if x.dim() == 2:
        fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=90)
        for pts, c, lab in ((target, "tab:green", "exact target"), (base, "tab:gray", "base"), (x, "tab:red", "model")):
            if pts is not None:
                p = pts[:1024].float()
                ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.35, c=c, label=lab)
        ax.set_xlim(-7, 7), ax.set_ylim(-6, 8), ax.legend(loc="upper right", fontsize=7, markerscale=4)
    else:
        n = min(16, len(x))
        imgs = ((x[:n].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        cols = 4
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2), dpi=90, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                ax.imshow(imgs[k].squeeze(), cmap="gray" if imgs[k].shape[-1] == 1 else None)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)


# ---- checkpoints of a run ----------------------------------------------------------------------------
def save_state(path: Path, net, opt, it: int, counters: Counters, pending: list, state: dict | None = None) -> None:
    """Atomic run checkpoint: net (safetensors; `state` instead of the whole net's state dict when
    given: the LoRA weights at full scale) + optimizer/counters/pending metrics (torch, weights-only)."""
    path.mkdir(parents=True, exist_ok=True)
    state = net.state_dict() if state is None else state
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "net.tmp"))
    torch.save({"opt": opt.state_dict(), "iteration": it, "counters": vars(counters), "pending": pending},
               path / "state.tmp")
    os.replace(path / "net.tmp", path / "net.safetensors")
    os.replace(path / "state.tmp", path / "state.pt")


def load_state(path: Path):
    if not (path / "state.pt").is_file() or not (path / "net.safetensors").is_file():
        return None
    st = torch.load(path / "state.pt", weights_only=True)
    st["net"] = load_file(str(path / "net.safetensors"))
    return st


# ---- what a run trains: the tiny net, or a full-scale SD model with LoRA -----------------------------------
@dataclass
class Setup:
    process: object
    policy: CountingPolicy  # θ
    ref: CountingPolicy
    new_behaviour: object  # () -> CountingPolicy: θ† for the next collection
    reward: object  # uncounted
    params: list  # the trainable parameters
    state: object  # () -> dict of what a checkpoint holds
    load: object  # (dict) -> None
    evaluator: object
    eval_process: object
    shape: tuple
    cond: object  # (it) -> prompt ids of iteration it
    to_images: object = None  # final samples -> images for the PNG (decode latents at full scale)
    gt: object = None


def _tiny_setup(rc, task_cfg, counters) -> Setup:
    kind, cfg_scale = rc["process"], float(rc["train"]["cfg_scale"])
    process = tasks.build_process(task_cfg, kind)
    base_reward = shared_reward(task_cfg)
    net = tasks.load_base(task_cfg, kind, tasks.DTYPES[rc["train"]["dtype"]])
    net.train().requires_grad_(True)
    shape = tasks.sample_shape(task_cfg.processes[kind].model)
    ref = CountingPolicy(frozen_copy(net), process, cfg_scale, counters)
    evaluator = tiny_evaluator(task_cfg, kind)
    gt = evaluator.gt
    cond = torch.tensor(list(rc["prompts"]["train"])).repeat_interleave(int(rc["train"]["batch_per_prompt"]))
    return Setup(process=process, policy=CountingPolicy(net, process, cfg_scale, counters), ref=ref,
                 new_behaviour=lambda: CountingPolicy(frozen_copy(net), process, cfg_scale, counters),
                 reward=base_reward, params=[p for p in net.parameters() if p.requires_grad],
                 state=net.state_dict, load=net.load_state_dict,
                 evaluator=evaluator,
                 eval_process=process, shape=shape, cond=lambda it: cond, gt=gt)


_SHARED: dict = {}


def _shared(what: str, key, build):
    """Per-process memo of what all runs of a bench share, built once: the reward (no state; CLIP-L
    etc. are not reloaded per run), the exact ground truth, the evaluator with its base samples. Each
    is a deterministic function of the config parts in `key`."""
    k = (what, json.dumps(key, sort_keys=True, default=str))
    if k not in _SHARED:
        _SHARED[k] = build()
    return _SHARED[k]


def shared_reward(task_cfg):
    """The task's reward, built once per process."""
    key = OmegaConf.to_container(task_cfg.reward, resolve=True)
    return _shared("reward", key, lambda: tasks.build_reward(task_cfg))


def tiny_evaluator(task_cfg, kind: str) -> Evaluator:
    """The evaluator of a tiny-profile task on process `kind` (base samples of the committed base
    model, the exact ground truth where the task has one), built once per process."""
    c = OmegaConf.to_container(task_cfg, resolve=True)
    ckpt = tasks.resolve_path(c["processes"][kind]["model"]["checkpoint"])
    stamp = (ckpt.stat().st_mtime_ns, ckpt.stat().st_size) if ckpt.is_file() else None  # a rewritten checkpoint
    key = [c["reward"], c.get("data"), c.get("alpha"), c["eval"], kind, c["processes"][kind], stamp,
           c["train"]["dtype"], c["train"]["cfg_scale"]]

    def build():
        process, reward = tasks.build_process(task_cfg, kind), shared_reward(task_cfg)
        ref = Policy(frozen_copy(tasks.load_base(task_cfg, kind, tasks.DTYPES[c["train"]["dtype"]])), process,
                     float(c["train"]["cfg_scale"]))
        return Evaluator(task_cfg, process, ref, reward, tasks.sample_shape(task_cfg.processes[kind].model),
                         tasks.ground_truth(task_cfg, reward))
    return _shared("evaluator", key, build)


def _full_setup(rc, task_cfg, m, counters) -> Setup:
    """SD1.5 / SD3.5 from `model` (local dir or HF cache) with a peft LoRA (rsmbench.run.fullscale): the
    reference is the adapter disabled, θ† a LoRA snapshot re-synced before each collection."""
    fsc, tr = rc["fullscale"], rc["train"]
    prompts = fullscale.load_prompts(rc["prompts"]["list"])
    F = fullscale.build(m, fsc["profile"], shared_reward(task_cfg), prompts=prompts, model=rc["model"]["name"],
                        hp=rc["hp"], precision=fsc["precision"], device=fsc.get("device"),
                        dtype=tasks.DTYPES[tr["dtype"]], num_steps=fsc.get("num_steps"),
                        cfg_scale=fsc.get("cfg_scale"), resolution=fsc.get("resolution"), seed=int(rc["seed"]),
                        lora=fsc.get("lora"))
    process, w = F.ctx.process, F.ctx.policy.cfg_scale
    eval_steps = fsc.get("eval_steps") or F.profile.num_steps["eval"]
    eval_process = fullscale.make_profile_process(F.profile, F.pipe, eval_steps)
    ref = CountingPolicy(F.ctx.ref.net, process, w, counters)

    def new_behaviour():
        F.sync_behaviour()  # θ† ← θ: a LoRA snapshot, never a copy of the base model
        return CountingPolicy(F.ctx.behaviour.net, process, w, counters)

    P = len(prompts)
    train_ids = rc["prompts"].get("train")
    per_it, bpp = int(rc["prompts"].get("per_iteration") or P), int(tr["batch_per_prompt"])

    def cond(it):  # DDPO: prompts drawn uniformly from the list each iteration (seeded by run seed, iteration)
        if train_ids:
            ids = torch.tensor(list(train_ids))
        else:
            g = torch.Generator().manual_seed(int(rc["seed"]) * 1_000_003 + it)
            ids = torch.randint(P, (per_it,), generator=g)
        return ids.repeat_interleave(bpp)

    ev = OmegaConf.create(OmegaConf.to_container(task_cfg, resolve=True))
    ev.eval.prompts = list(rc["eval"].get("prompts") or range(P))
    evaluator = Evaluator(ev, eval_process, Policy(F.ctx.ref.net, eval_process, w), F.ctx.reward, F.ctx.shape)

    @torch.no_grad()
    def to_images(x):
        return F.ctx.reward.decode(x[:16]).cpu()

    return Setup(process=process, policy=CountingPolicy(F.net, process, w, counters), ref=ref,
                 new_behaviour=new_behaviour, reward=F.ctx.reward, params=F.net.lora_parameters(),
                 state=lambda: fullscale.trainable_state(F.net),
                 load=lambda sd: fullscale.load_trainable_state(F.net, sd),
                 evaluator=evaluator, eval_process=eval_process, shape=F.ctx.shape, cond=cond, to_images=to_images)


# ---- the loop ---------------------------------------------------------------------------------------
def row_chunks(batch, max_rows: int):
    """[(micro-batch, its share of the rows)]: the batch's training rows in contiguous chunks of at most
    `max_rows` (0: the whole batch). Σ share·loss(chunk) is the batch loss when the loss is a mean over
    rows (per-element means ⟨·⟩ and sample means are); its gradient is accumulated chunk by chunk."""
    R = len(batch.rows)
    if not max_rows or R <= max_rows:
        return [(batch, 1.0)]
    return [(batch.select_rows(idx), len(idx) / R) for idx in torch.arange(R).split(max_rows)]


@dataclass
class RunResult:
    iterations: int
    counters: Counters
    final_eval: dict = field(default_factory=dict)


def _stat(v) -> float:
    return float(v.detach().double().mean()) if torch.is_tensor(v) else float(v)


def _check_finite(name: str, v: torch.Tensor, it: int) -> None:
    if not torch.isfinite(v.detach()).all():
        bad = "NaN" if torch.isnan(v.detach()).any() else "inf"
        raise NonFiniteError(f"{name} is {bad} at iteration {it}; the run is stopped")


def train_run(rc: dict, task_cfg, log_metrics=None, log_artifact=None, ckpt_dir: Path | None = None,
              on_iteration=None, stop_after: int | None = None) -> RunResult:
    """Run one method × formulation × process × seed to its reward-query budget.

    log_metrics(metrics: dict, step) and log_artifact(path) receive what is logged (MLflow in the
    bench; lists in tests). ``stop_after`` simulates a kill after that many iterations (tests).
    """
    torch.manual_seed(rc["seed"])
    m = registry.get(rc["method"])
    kind, formulation = rc["process"], rc["formulation"]
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)}")
    tr = rc["train"]
    counters = Counters()
    S = _tiny_setup(rc, task_cfg, counters) if rc["profile"] == "tiny" else _full_setup(rc, task_cfg, m, counters)
    process, policy, ref, shape, gt, evaluator = S.process, S.policy, S.ref, S.shape, S.gt, S.evaluator
    net, cfg_scale = policy.net, policy.cfg_scale
    reward = CountingReward(S.reward, counters)
    opt = torch.optim.AdamW(S.params, lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    log_metrics = log_metrics or (lambda metrics, step: None)
    log_artifact = log_artifact or (lambda path: None)

    start, pending = 0, []
    st = load_state(ckpt_dir) if ckpt_dir is not None else None
    if st is not None:  # resume
        S.load(st["net"])
        opt.load_state_dict(st["opt"])
        start = int(st["iteration"])
        counters.__dict__.update(st["counters"])
        pending = st["pending"]
    for step, metrics in pending:  # logged before the kill? the logger drops steps already present
        log_metrics(metrics, step)
    pending = []

    budget = int(rc["budget"]["reward_queries"])
    max_it, every, ck_every = int(tr["max_iterations"]), int(rc["eval"]["every"]), int(tr["checkpoint_every"])
    ctx_hp = dict(rc["hp"])
    micro_rows = int(tr.get("micro_rows") or 0)  # gradient accumulation over row chunks (full scale)

    def evaluate(it: int) -> dict:
        net.eval()
        ev, x = evaluator(Policy(net, S.eval_process, cfg_scale), at_base=it == 0)  # θ = base at iteration 0
        ev["iteration"] = it
        if gt is not None and it == 0:
            ev.update({f"eval/{k}": v for k, v in evaluator.base_extra.items()})
        if ckpt_dir is not None:
            png = ckpt_dir / f"samples_{it:06d}.png"
            title = f"{rc['method']} ({formulation}, {kind}, seed {rc['seed']}) iteration {it}"
            if S.to_images is not None:
                plot_samples(png, S.to_images(x), title)
            else:
                plot_samples(png, x, title, base=evaluator.base.final, target=None if gt is None else gt.exact_a)
            log_artifact(png)
        return ev

    if start == 0:
        pending.append((0, evaluate(0)))
    it, t_prev, final_eval = start, time.time(), {}
    while counters.reward_queries < budget and it < max_it:
        if stop_after is not None and it - start >= stop_after:
            break
        it += 1
        behaviour = S.new_behaviour()
        cond = S.cond(it)
        ctx = Context(process=process, policy=policy, ref=ref, behaviour=behaviour, reward=reward,
                      hp=ctx_hp, shape=shape)
        seeds = [(rc["seed"] * 1_000_003 + it) * 65_536 + k for k in range(len(cond))]
        net.eval()
        batch = m.collect(ctx, cond, seeds)  # a net without classes ignores cond; groups use it
        m.prepare(batch, ctx)
        _check_finite("reward", batch.rewards, it)
        net.train()
        losses, gnorms, stat_sums = [], [], {}
        n_updates = int(ctx_hp.get("inner_updates", tr["inner_updates"]))
        for _ in range(n_updates):
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for mb, frac in row_chunks(batch, micro_rows):
                if formulation == "original":
                    part = m.original_loss(mb, ctx)
                else:
                    # design-space knobs (temporal profile, extra C2) act on the RSM instance only
                    part = rsm.rsm_loss(policy, ref, design.apply(m.rsm_spec(mb, ctx), process, ctx_hp))
                _check_finite("loss", part, it)
                (part * frac).backward() if frac != 1.0 else part.backward()
                loss = loss + part.detach() * frac
                for k, v in mb.extras.pop("stats", {}).items():  # row-weighted mean over chunks and updates
                    stat_sums[k] = stat_sums.get(k, 0.0) + _stat(v) * frac / n_updates
            gn = torch.nn.utils.clip_grad_norm_(S.params, float(tr["grad_clip"]))
            _check_finite("gradient norm", gn, it)
            opt.step()
            if hasattr(m, "on_optimizer_step"):  # e.g. VGG-Flow's quantile clip threshold update
                m.on_optimizer_step()
            losses.append(loss.item()), gnorms.append(gn.item())
        now = time.time()
        counters.wall_time += now - t_prev
        t_prev = now
        r = batch.rewards.detach().double()
        metrics = {"iteration": it, "train/reward_mean": r.mean().item(), "train/reward_std": r.std().item(),
                   "train/reward_queries": counters.reward_queries, "train/nfe": counters.nfe,
                   "train/wall_time": counters.wall_time, "train/loss": float(np.mean(losses)),
                   "train/grad_norm": float(np.mean(gnorms))}
        stats = {**batch.extras.get("stats", {}), **stat_sums}  # collect-time stats, then the loss's
        metrics.update({f"train/{k}": _stat(v) for k, v in stats.items()})
        if "approx_kl" not in stats:
            metrics["train/approx_kl"] = _approx_kl(process, policy.net, behaviour, batch, cfg_scale, micro_rows)
        for k in ("nfe", "reward_queries"):
            if k in batch.extras:
                metrics[f"train/method_reported_{k}"] = _stat(batch.extras[k])
        done = counters.reward_queries >= budget or it >= max_it
        if done or it % every == 0:
            final_eval = evaluate(it)
            metrics.update(final_eval)
        pending.append((it, metrics))
        if on_iteration:
            on_iteration(it, metrics)
        if ckpt_dir is not None and (done or it % ck_every == 0):
            save_state(ckpt_dir, net, opt, it, counters, pending, S.state())
            for step, mm in pending:
                log_metrics(mm, step)
            pending = []
        t_prev = time.time()  # eval and logging are not training wall time
    if ckpt_dir is None:
        for step, mm in pending:
            log_metrics(mm, step)
    return RunResult(iterations=it, counters=counters, final_eval=final_eval)


@torch.no_grad()
def _approx_kl(process, net, behaviour, batch, cfg_scale, chunk_rows: int = 0) -> float:
    """Mean per-step KL(p_θ ‖ p_θ†) per element over the batch's stochastic rows, after the update."""
    rows = batch.rows
    keep = getattr(rows, "stochastic", None)
    if keep is None or getattr(rows, "mean", None) is None:
        return float("nan")
    if not bool(keep.any()):
        return float("nan")
    rows = rows.select(torch.nonzero(keep).flatten())
    pol, kls = Policy(net, process, cfg_scale), []
    for idx in torch.arange(len(rows)).split(chunk_rows or len(rows)):  # bounded memory at full scale
        r = rows.select(idx)
        kls.append(process.kl(process.mean(r.x, pol(r.x, r.step, r.cond), r.step), r.mean, r.step))
    return torch.cat(kls).mean().item()

"""What a run trains, built from its spec alone: the tiny base network of a task, or a full-scale SD
model with a peft LoRA (``rsmbench.run.fullscale``), with its policies, reward, prompts and evaluator.

The reward and the evaluator (with the base model's samples) are shared by every run of one process
(``shared``): each is a deterministic function of the spec parts it is keyed on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from rsmbench.core.models import Policy, frozen_copy
from rsmbench.core.process import make_process
from rsmbench.run import fullscale, paths, tasks
from rsmbench.run.accounting import Counters, CountingPolicy
from rsmbench.run.evaluate import Evaluator


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
    evaluator: Evaluator | None  # None on ranks other than 0 (they do not evaluate)
    eval_process: object
    shape: tuple
    cond: object  # (it) -> prompt ids of iteration it
    to_images: object = None  # final samples -> images for the PNG (decode latents at full scale)
    gt: object = None


_SHARED: dict = {}


def shared(what: str, key, build):
    """Per-process memo of what all runs of a bench share, built once: the reward (no state; CLIP-L
    etc. are not reloaded per run) and the evaluator with its base samples and exact ground truth."""
    k = (what, json.dumps(key, sort_keys=True, default=str))
    if k not in _SHARED:
        _SHARED[k] = build()
    return _SHARED[k]


def shared_reward(reward: dict):
    """The reward of a spec's (or task's) ``reward`` section, built once per process."""
    reward = tasks._plain(reward)
    return shared("reward", reward, lambda: tasks.make_reward(reward))


KL_ROWS = 64  # the tiny evaluator's path KL: states per reference-net call (``Evaluator.kl_to_ref``)


def tiny_evaluator(spec: dict) -> Evaluator:
    """The evaluator of a tiny-profile run spec (or ``runspec.eval_spec``): the base model's samples
    on the pinned seeds, and the exact ground truth where the task has one; built once per process."""
    key = {k: spec[k] for k in ("task", "process", "train", "eval", "alpha", "reward", "data",
                                "process_kwargs", "model")}
    key["train"] = {k: spec["train"][k] for k in ("dtype", "cfg_scale")}

    def build():
        process = make_process(spec["process"], **spec["process_kwargs"])
        reward = shared_reward(spec["reward"])
        net = tasks.base_network(spec["model"], spec["task"], tasks.DTYPES[spec["train"]["dtype"]])
        ref = Policy(frozen_copy(net), process, float(spec["train"]["cfg_scale"]))
        gt = tasks.exact_optimum(spec["data"], reward, spec["alpha"])
        cache = _BaseMetricsCache(key) if gt is not None else None
        ev = Evaluator(spec["eval"], process, ref, reward, tasks.sample_shape(spec["model"]), gt,
                       base_extra=cache and cache.get(), kl_rows=KL_ROWS)
        if cache:
            cache.put(ev.base_extra)
        return ev
    return shared("evaluator", key, build)


class _BaseMetricsCache:
    """The base model's exact-task metrics (J* by Monte Carlo over ``eval.jstar_samples`` base samples,
    SW floors: ~10 s per gmm twin) in ``results/cache/base_metrics.json``, keyed on the evaluator's spec
    (which holds the checkpoint's sha256) and the code that computes them, so the bench's workers and
    later benches build each twin's once."""

    FILE, CODE = "base_metrics.json", ("rewards", "rsmbench/core", "rsmbench/data", "rsmbench/run/evaluate.py")

    def __init__(self, key: dict):
        spec = json.dumps(key, sort_keys=True, default=str) + paths.code_fingerprint(self.CODE)
        self.key = hashlib.sha256(spec.encode()).hexdigest()[:24]

    def get(self) -> dict | None:
        return paths.read_cache(self.FILE).get(self.key)

    def put(self, metrics: dict) -> None:
        data = paths.read_cache(self.FILE)
        if data.get(self.key) != metrics:
            paths.write_cache(self.FILE, {**data, self.key: metrics})


def prompt_draws(spec: dict, num_prompts: int | None = None):
    """it -> the prompt ids of iteration it, each repeated ``train.batch_per_prompt`` times (one group each):
    * ``prompts.train`` without ``per_iteration``: that fixed list, every iteration;
    * ``prompts.train`` with ``per_iteration`` k: k distinct ids of that list, drawn afresh each iteration;
    * no ``prompts.train`` (full scale): ``per_iteration`` ids (default: ``num_prompts``) drawn uniformly from the
      whole list of ``num_prompts`` with replacement, as DDPO draws its prompts (ddpo-pytorch@1958463
      scripts/train.py:319, one ``prompt_fn()`` per sample; ddpo_pytorch/prompts.py:43 ``from_file`` picks a line
      uniformly).
    Draws are seeded by (run seed, iteration), so a resumed run collects the same prompts."""
    train_ids, per_it = spec["prompts"].get("train"), spec["prompts"].get("per_iteration")
    bpp = int(spec["train"]["batch_per_prompt"])  # per_iteration ≤ len(train): schema._tiny

    def cond(it: int) -> torch.Tensor:
        if train_ids and not per_it:
            ids = torch.tensor(list(train_ids))
        else:
            g = torch.Generator().manual_seed(int(spec["seed"]) * 1_000_003 + it)
            if train_ids:
                ids = torch.tensor(list(train_ids))[torch.randperm(len(train_ids), generator=g)[: int(per_it)]]
            else:
                ids = torch.randint(num_prompts, (int(per_it or num_prompts),), generator=g)
        return ids.repeat_interleave(bpp)

    return cond


def tiny_setup(spec: dict, counters: Counters, with_eval: bool = True) -> Setup:
    """The task's committed base network, trained in full; θ† a frozen copy at each collection."""
    kind, cfg_scale = spec["process"], float(spec["train"]["cfg_scale"])
    process = make_process(kind, **spec["process_kwargs"])
    net = tasks.base_network(spec["model"], spec["task"], tasks.DTYPES[spec["train"]["dtype"]])
    net.train().requires_grad_(True)
    evaluator = tiny_evaluator(spec) if with_eval else None
    return Setup(process=process, policy=CountingPolicy(net, process, cfg_scale, counters),
                 ref=CountingPolicy(frozen_copy(net), process, cfg_scale, counters),
                 new_behaviour=lambda: CountingPolicy(frozen_copy(net), process, cfg_scale, counters),
                 reward=shared_reward(spec.get("train_reward") or spec["reward"]),
                 params=[p for p in net.parameters() if p.requires_grad],
                 state=net.state_dict, load=net.load_state_dict, evaluator=evaluator, eval_process=process,
                 shape=tasks.sample_shape(spec["model"]), cond=prompt_draws(spec), gt=evaluator and evaluator.gt)


def full_setup(spec: dict, m, counters: Counters, with_eval: bool = True) -> Setup:
    """SD1.5 / SD3.5 from `model` (local dir or HF cache) with a peft LoRA: the reference is the
    adapter disabled, θ† a LoRA snapshot re-synced before each collection (the base is never copied);
    prompts are drawn from the task's prompt list each iteration."""
    fsc, tr = spec["fullscale"], spec["train"]
    prompts = fullscale.load_prompts(spec["prompts"]["list"])
    F = fullscale.build(m, fsc["profile"], shared_reward(spec["reward"]), prompts=prompts,
                        model=spec["model"]["name"], hp=spec["hp"], precision=fsc["precision"],
                        device=fsc.get("device"), dtype=tasks.DTYPES[tr["dtype"]], num_steps=fsc.get("num_steps"),
                        cfg_scale=fsc.get("cfg_scale"), resolution=fsc.get("resolution"), seed=int(spec["seed"]),
                        lora=fsc.get("lora"))
    process, w = F.ctx.process, F.ctx.policy.cfg_scale
    eval_steps = fsc.get("eval_steps") or F.profile.num_steps["eval"]
    eval_process = fullscale.make_profile_process(F.profile, F.pipe, eval_steps)

    def new_behaviour():
        F.sync_behaviour()  # θ† ← θ: a LoRA snapshot, never a copy of the base model
        return CountingPolicy(F.ctx.behaviour.net, process, w, counters)

    P = len(prompts)
    ev = {**spec["eval"], "prompts": list(spec["eval"].get("prompts") or range(P))}
    evaluator = Evaluator(ev, eval_process, Policy(F.ctx.ref.net, eval_process, w), F.ctx.reward,
                          F.ctx.shape) if with_eval else None

    @torch.no_grad()
    def to_images(x):
        return F.ctx.reward.decode(x[:16]).cpu()

    return Setup(process=process, policy=CountingPolicy(F.net, process, w, counters),
                 ref=CountingPolicy(F.ctx.ref.net, process, w, counters), new_behaviour=new_behaviour,
                 reward=F.ctx.reward, params=F.net.lora_parameters(),
                 state=lambda: fullscale.trainable_state(F.net),
                 load=lambda sd: fullscale.load_trainable_state(F.net, sd),
                 evaluator=evaluator, eval_process=eval_process, shape=F.ctx.shape, cond=prompt_draws(spec, P),
                 to_images=to_images)


def build(spec: dict, m, counters: Counters, with_eval: bool = True) -> Setup:
    """The run's setup; ``with_eval=False`` skips the evaluator (ranks other than 0)."""
    if spec["profile"] == "tiny":
        return tiny_setup(spec, counters, with_eval)
    return full_setup(spec, m, counters, with_eval)

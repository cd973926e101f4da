"""GenEval-style accuracy of a shapes model on the held-out prompts, and a captioned sample grid.

    python -m rsmbench.run.shapes_eval [--task shapes] [--process flow] [--per-prompt 16] [--on eval|train]
                                       [--weights RUN_DIR/net.safetensors]
                                       [--grid PATH] [--grid-per-prompt 1] [key=value ...]

Samples ``per-prompt`` images of every ``eval.prompts`` id (``--on train``: of every ``prompts.train`` id, the
prompts the methods train on, so that what a method learnt is told apart from what carries over to the held-out
prompts) from the task's committed base model
(or, with ``--weights``, a run's final network: ``results/runs/<hash>/net.safetensors`` of a run on
that process) with the task's sampler (``eval.sampler``), guidance (``train.cfg_scale``) and seeds from
``eval.seed_start``, scores them with the task's reward (``eval_metrics``: strict accuracy per
category and their mean) and prints one JSON line, with the samples' ``block_roughness`` (the
2×2 texture a model can use to fool the detector; the rendered data's is ``roughness_data``).
``--grid`` writes the first ``grid-per-prompt`` samples of each prompt, captioned with the prompt and
framed by pass/fail (``rsmbench.run.evaluate.plot_captioned_grid``), one row per prompt where
``grid-per-prompt`` > 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from rsmbench.core.models import Policy
from rsmbench.core.rollout import generators, sample
from rsmbench.data import shapes as S
from rsmbench.data.sources import data_source
from rsmbench.run import tasks
from rsmbench.run.evaluate import plot_captioned_grid


def data_roughness(cfg) -> float:
    """``block_roughness`` of 128 scenes of the task's pretraining data (seed 3): the texture floor."""
    data = data_source("shapes", **OmegaConf.to_container(cfg.data.cfg, resolve=True))
    return S.block_roughness(data.sample(128, torch.Generator().manual_seed(3))[0])


@torch.no_grad()
def eval_samples(cfg, kind: str, per_prompt: int, net=None, chunk: int = 128, prompts=None):
    """(x, cond): ``per_prompt`` samples of each eval prompt (or of ``prompts``; prompt-major), seeds
    eval.seed_start + k."""
    process = tasks.build_process(cfg, kind)
    net = tasks.load_base(cfg, kind) if net is None else net
    policy = Policy(net.eval(), process, float(cfg.train.cfg_scale))
    cond = torch.tensor(list(cfg.eval.prompts if prompts is None else prompts)).repeat_interleave(per_prompt)
    seeds = [int(cfg.eval.seed_start) + k for k in range(len(cond))]
    stochastic = None if cfg.eval.sampler == "sde" else torch.zeros(process.num_steps, dtype=torch.bool)
    shape = tasks.sample_shape(cfg.processes[kind].model)
    xs = [sample(policy, shape, generators(seeds[i:i + chunk]), cond=cond[i:i + chunk],
                 stochastic=stochastic).final for i in range(0, len(cond), chunk)]
    return torch.cat(xs), cond


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="shapes")
    p.add_argument("--process", default="flow")
    p.add_argument("--per-prompt", type=int, default=16)
    p.add_argument("--on", choices=("eval", "train"), default="eval",
                   help="the held-out eval prompts (eval.prompts) or the train prompts (prompts.train)")
    p.add_argument("--weights", default=None, help="a run's net.safetensors (default: the base model)")
    p.add_argument("--grid", default=None)
    p.add_argument("--grid-per-prompt", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if not 1 <= a.grid_per_prompt <= a.per_prompt:
        print(f"shapes_eval: --grid-per-prompt {a.grid_per_prompt} must be between 1 and --per-prompt {a.per_prompt}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cfg = tasks.load(a.task, a.overrides)
    reward = tasks.build_reward(cfg)
    net = tasks.load_base(cfg, a.process)
    if a.weights:
        run_cfg = Path(a.weights).with_name("config.json")  # a run's directory says which twin it trained
        trained = json.loads(run_cfg.read_text()).get("process") if run_cfg.is_file() else a.process
        if trained != a.process:
            print(f"shapes_eval: --weights {a.weights} is a {trained} run; pass --process {trained}", file=sys.stderr)
            return 2
        try:
            net.load_state_dict(load_file(a.weights))
        except Exception as e:  # noqa: BLE001 - missing, not safetensors, or another network's weights
            print(f"shapes_eval: cannot load --weights {a.weights} into the {a.process} twin: "
                  f"{(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
            return 2
    prompts = list(cfg.eval.prompts if a.on == "eval" else cfg.prompts.train)
    x, cond = eval_samples(cfg, a.process, a.per_prompt, net=net, prompts=prompts)
    metrics = reward.eval_metrics(x, cond)
    rough = {"roughness": round(S.block_roughness(x), 4), "roughness_data": round(data_roughness(cfg), 4)}
    print(json.dumps({"task": a.task, "process": a.process, "weights": a.weights or "base", "on": a.on,
                      "per_prompt": a.per_prompt,
                      "cfg_scale": float(cfg.train.cfg_scale), **metrics, **rough}))
    if a.grid:
        keep = torch.cat([torch.arange(a.grid_per_prompt) + k * a.per_prompt for k in range(len(prompts))])
        ok = reward.passed(x[keep], cond[keep])
        names = [cfg.prompts.names[int(i)] for i in cond[keep]]
        ncol = a.grid_per_prompt if a.grid_per_prompt > 1 else min(11, len(keep))
        plot_captioned_grid(a.grid, x[keep], names, passed=ok.tolist(), ncol=ncol,
                            title=f"{a.task} {a.process} {a.weights or 'base model'}, "
                                  f"CFG {float(cfg.train.cfg_scale)}, {a.on} prompts"
                                  f": overall accuracy {metrics['accuracy/overall']:.2f}"
                                  + (f" (audit {metrics['audit/overall']:.2f})" if "audit/overall" in metrics else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

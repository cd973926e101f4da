"""Rollout throughput: our sampler vs diffusers' own DDIM loop driving the same tiny UNet.

Goal (issue 2): ours ≤ 1.05× diffusers' time. Ours also stores states, noises, means, outputs and
log-probs, and draws one generator stream per sample.
"""
import torch
from diffusers import DDIMScheduler

from rsmbench.core.models import Policy, build_net
from rsmbench.core.process import DiffusionProcess
from rsmbench.core.rollout import generators, sample

B, STEPS, SHAPE = 8, 10, (3, 16, 16)


def _setup():
    torch.set_num_threads(2)
    p = DiffusionProcess(num_steps=STEPS, eta=1.0)
    net = build_net("unet", "epsilon", sample_size=16, channels=3, block_out_channels=(32, 64)).eval()
    return p, net


def test_rsmbench_rollout(benchmark):
    p, net = _setup()
    pol = Policy(net, p)
    benchmark.pedantic(lambda: sample(pol, SHAPE, generators(range(B))), rounds=5, warmup_rounds=1)


def test_diffusers_ddim_loop(benchmark):
    p, net = _setup()
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    sch.set_timesteps(STEPS)

    @torch.no_grad()
    def loop():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, *SHAPE, generator=g)
        for t in sch.timesteps:
            out = net(x, t.float().expand(B))
            x = sch.step(out, t, x, eta=1.0, generator=g).prev_sample
        return x

    benchmark.pedantic(loop, rounds=5, warmup_rounds=1)

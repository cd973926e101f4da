"""DDP through accelerate on CPU (gloo): LoRA gradients of a tiny SD1.5-shaped pipeline.

Same global batch (4 samples, 2 prompts), same seeds, float64; REINFORCE+KL (group advantages,
so the rewards must be gathered across processes):
    (a) 1 process, no accumulation          (reference)
    (b) 2 processes, each half the batch     → same LoRA gradients, identical on both ranks
    (c) 1 process, 2 accumulation steps      → same LoRA gradients
Tolerance: max |Δg| ≤ 1e-12 · max |g| (float64; all-reduce and summation order only).
Every configuration runs in spawned child processes (accelerate's state is a process singleton).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

PROMPTS = ["a cat", "a dog"]
COND = torch.tensor([0, 1, 0, 1])
SEEDS = [21, 22, 23, 24]


class SmoothReward:
    name, title, differentiable = "smooth", "smooth", True

    def __call__(self, x, cond=None):
        return -((x - 0.2) ** 2).flatten(1).mean(1) * 10 + x[:, 0].flatten(1).mean(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, accum, port, out_dir, formulation):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes",
                      GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    from rsmbench.core.method import get
    from rsmbench.run import distributed as dist
    from rsmbench.run import fullscale as fs

    AcceleratorState._reset_state(True)
    acc = dist.make_accelerator(grad_accum=accum, cpu=True)
    assert acc.num_processes == world
    m = get("reinforce_kl")
    F = fs.build(m, "sd15", SmoothReward(), prompts=PROMPTS, pipe=fs.random_pipeline("diffusion", seed=0),
                 precision="fp64", dtype=torch.float64, device="cpu", num_steps=2, resolution=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in F.net.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    F.sync_behaviour()
    opt = dist.prepare(F, torch.optim.SGD(F.net.lora_parameters(), lr=0.5), acc)
    if world > 1:
        assert isinstance(F.extra["ddp_model"], torch.nn.parallel.DistributedDataParallel)
    batch = dist.collect(m, F.ctx, COND, SEEDS, acc)
    dist.accumulate_gradients(m, F.ctx, batch, acc, F.extra["ddp_model"], formulation)
    grads = torch.cat([p.grad.reshape(-1) for p in F.net.lora_parameters()])
    opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in F.net.lora_parameters()])
    torch.save({"grad": grads, "params": params}, os.path.join(out_dir, f"w{world}_a{accum}_r{rank}.pt"))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run(world, accum, out_dir, formulation="original"):
    # spawn, not fork: forking a process whose torch thread pools already ran can deadlock
    mp.start_processes(_worker, args=(world, accum, _free_port(), str(out_dir), formulation), nprocs=world,
                       start_method="spawn")
    return [torch.load(out_dir / f"w{world}_a{accum}_r{r}.pt") for r in range(world)]


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_split_batch_equals_whole_batch(tmp_path, formulation="original"):
    ref = _run(1, 1, tmp_path, formulation)[0]
    assert ref["grad"].abs().max() > 0
    for world, accum in ((2, 1), (1, 2)):
        outs = _run(world, accum, tmp_path, formulation)
        for o in outs:
            assert _rel(ref["grad"], o["grad"]) <= 1e-12, (world, accum)
            assert _rel(ref["params"], o["params"]) <= 1e-12, (world, accum)  # the same optimizer update
        assert torch.equal(outs[0]["grad"], outs[-1]["grad"])  # synchronised across ranks


def test_shard_and_micro_batches():
    from types import SimpleNamespace

    from rsmbench.run import distributed as dist

    acc = SimpleNamespace(num_processes=2, process_index=1)
    assert dist.shard(8, acc) == slice(4, 8)
    with pytest.raises(ValueError, match="not divisible"):
        dist.shard(5, acc)

"""One loop for 1 and N processes (rsmbench.run.distributed), on CPU with gloo.

(1) `rsmbench bench` launched with 2 processes (torchrun) logs the same metrics as 1 process with
    gradient accumulation over the same row chunks: same seeds, same global batch, float32;
    tolerance |Δ| ≤ 1e-6·max(|a|, |b|) + 1e-9 (the order of floating-point sums differs).
(2) The LoRA gradients of a tiny SD1.5-shaped pipeline: 2 processes with each half the batch give
    the gradients of 1 process, identical on both ranks (float64, 1e-12 relative): the reference and
    behaviour views share the backbone, the multi-GPU LoRA pitfall of ddpo-pytorch #10.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from tests.bench_helpers import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(uri: str) -> dict:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("gmm")
    out = {}
    for r in c.search_runs([exp.experiment_id]):
        assert r.info.status == "FINISHED", r.data.tags.get("error")
        out[r.info.run_name] = {k: [(m.step, m.value) for m in sorted(c.get_metric_history(r.info.run_id, k),
                                                                      key=lambda m: m.step)]
                                for k in r.data.metrics if k != "train/wall_time"}
    return out


def _bench(tmp_path, name, nproc, extra):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / name}.db",
               RSMBENCH_RESULTS=str(tmp_path / name), HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    args = ["bench", "--task", "gmm", "--methods", "reinforce_kl,grpo", "--seeds", "1", "--no-progress",
            "--report-dir", str(tmp_path / name / "report"), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "rsmbench.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "rsmbench.cli", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return _history(env["MLFLOW_TRACKING_URI"]), res


@pytest.mark.slow
def test_bench_on_two_processes_logs_what_one_process_with_accumulation_logs(tmp_path):
    # 8 samples × 10 steps = 80 rows per iteration; 2 processes hold 40 each, 1 process accumulates 2 × 40
    extra = tiny_overrides(tmp_path, iterations=4, batch=8) + ["train.micro_rows=40"]
    one, _ = _bench(tmp_path, "one", 1, extra)
    two, res = _bench(tmp_path, "two", 2, extra)
    assert "2 processes" in res.stdout and res.stdout.count("summary written to") == 1  # rank 0 alone reports
    assert set(one) == set(two) == {"reinforce_kl-original-flow-s0", "grpo-original-flow-s0"}
    for run in one:
        assert set(one[run]) == set(two[run])
        assert len(one[run]["train/loss"]) == 4 and len(one[run]["eval/reward_mean"]) == 3
        for key, series in one[run].items():
            other = two[run][key]
            assert [s for s, _ in series] == [s for s, _ in other], (run, key)
            for (_, a), (_, b) in zip(series, other):
                assert abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-9, (run, key, a, b)
    # the budget is counted over both processes: 4 iterations × 8 samples
    assert [v for _, v in two["grpo-original-flow-s0"]["train/reward_queries"]] == [8.0, 16.0, 24.0, 32.0]


# ---- (2) LoRA gradients of a full-scale-shaped pipeline --------------------------------------------------
PROMPTS = ["a cat", "a dog"]
COND = torch.tensor([0, 1, 0, 1])
SEEDS = [21, 22, 23, 24]


class SmoothReward:
    name, title, differentiable = "smooth", "smooth", True

    def __call__(self, x, cond=None):
        return -((x - 0.2) ** 2).flatten(1).mean(1) * 10 + x[:, 0].flatten(1).mean(1)


def _worker(rank, world, port, out_dir, formulation):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes",
                      GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    from rsmbench.core.method import formulation_loss, get
    from rsmbench.run import distributed
    from rsmbench.run import fullscale as fs
    from rsmbench.run.train import row_chunks

    AcceleratorState._reset_state(True)
    dist = distributed.Multi(cpu=True) if world > 1 else distributed.Single()
    m = get("reinforce_kl")
    F = fs.build(m, "sd15", SmoothReward(), prompts=PROMPTS, pipe=fs.random_pipeline("diffusion", seed=0),
                 precision="fp64", dtype=torch.float64, device="cpu", num_steps=2, resolution=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in F.net.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    F.sync_behaviour()
    params = F.net.lora_parameters()
    opt = torch.optim.SGD(params, lr=0.5)
    batch, _ = dist.collect(m, F.ctx, COND, SEEDS)
    (total,) = dist.sum([len(batch.rows)])
    for mb, share in row_chunks(batch, 0, total):
        (formulation_loss(m, formulation, mb, F.ctx) * share).backward()
    dist.reduce_gradients(params)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    opt.step()
    out = {"grad": grads, "params": torch.cat([p.detach().reshape(-1) for p in params])}
    torch.save(out, os.path.join(out_dir, f"w{world}_r{rank}.pt"))
    dist.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _spawn(world, out_dir, formulation):
    # spawn, not fork: forking a process whose torch thread pools already ran can deadlock
    mp.start_processes(_worker, args=(world, _free_port(), str(out_dir), formulation), nprocs=world,
                       start_method="spawn")
    return [torch.load(out_dir / f"w{world}_r{r}.pt") for r in range(world)]


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("formulation", ["original", "rsm"])
def test_lora_gradients_of_two_processes_equal_one(tmp_path, formulation):
    ref = _spawn(1, tmp_path, formulation)[0]
    assert ref["grad"].abs().max() > 0
    outs = _spawn(2, tmp_path, formulation)
    for o in outs:
        assert _rel(ref["grad"], o["grad"]) <= 1e-12
        assert _rel(ref["params"], o["params"]) <= 1e-12  # the same optimizer update
    assert torch.equal(outs[0]["grad"], outs[1]["grad"])  # synchronised across ranks


def test_shard_divides_the_global_batch():
    from rsmbench.run.distributed import Multi

    d = Multi.__new__(Multi)
    d.world, d.rank = 2, 1
    assert d.shard(8) == slice(4, 8)
    with pytest.raises(ValueError, match="not divisible"):
        d.shard(5)

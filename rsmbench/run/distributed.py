"""One training loop for 1 and N processes: what ``train.train_run`` does differently under
``accelerate launch --num_processes N`` (or ``torchrun --nproc_per_node N``), through accelerate.

The contract: with the same global batch (G samples) and the same seeds, N processes give the same
update as 1 process, up to the order of floating-point sums. It follows from

- a contiguous shard of the global batch per process (``shard``), each sample with its own
  generator, so a sample's trajectory does not depend on where it is drawn (``rsmbench.core.rollout``);
- advantages from the *gathered* rewards and prompt ids (``collect``): DDPO gathers rewards across
  processes before its per-prompt statistics, and a per-process group mean would change the update;
- every loss a mean over training rows, so each chunk of a process's rows is weighted by its share
  of the *global* row count (``train.row_chunks``), and the gradients are summed over processes
  (``reduce_gradients``, one all-reduce of the flattened trainable gradients): Σ_p Σ_chunks
  share·∇loss(chunk) = ∇ of the global mean, the same sum that gradient accumulation forms in one process;
- reward queries, NFEs and the loss statistics summed over processes (``sum``), so the budget and
  every logged number are global; rank 0 alone evaluates, checkpoints and logs to MLflow.

Not sharded yet: methods that train on branching trees (their rewards are per leaf and their groups
span roots) stop with a message, and a method's own cross-iteration state (a replay buffer, a learned
value network) is kept per process.

Gradients are reduced explicitly rather than through a DDP wrapper, so the tiny networks and the
full-scale LoRA (whose reference and behaviour views share the backbone: the pitfall of
ddpo-pytorch #10 / diffusers #4046) take the same path.
"""
from __future__ import annotations

import os

import torch

from rsmbench.core.method import Batch


def launched() -> bool:
    """True under a multi-process launcher (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Single:
    """One process: every collective is the identity (the loop's default)."""

    world, rank, is_main = 1, 0, True

    def shard(self, n_global: int) -> slice:
        return slice(0, n_global)

    def collect(self, method, ctx, cond, seeds) -> tuple[Batch, torch.Tensor]:
        """(batch, the rewards of the whole batch): ``collect`` then ``prepare``."""
        batch = method.collect(ctx, cond, seeds)
        method.prepare(batch, ctx)
        return batch, batch.rewards

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def reduce_gradients(self, params) -> None:
        pass

    def broadcast(self, obj):
        return obj

    def barrier(self) -> None:
        pass


class Multi(Single):
    """N processes of one accelerate ``Accelerator`` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, accelerator=None, cpu: bool | None = None):
        from accelerate import Accelerator  # lazy: multi-process runs only

        cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        self.acc = accelerator or Accelerator(cpu=cpu)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.is_main = self.acc.is_main_process

    def shard(self, n_global: int) -> slice:
        """This process's contiguous slice of a global batch of n_global samples (must divide evenly)."""
        if n_global % self.world:
            raise ValueError(f"global batch {n_global} is not divisible by {self.world} processes")
        k = n_global // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def collect(self, method, ctx, cond, seeds) -> tuple[Batch, torch.Tensor]:
        """(this process's batch, the gathered rewards): collect this process's shard (cond, seeds:
        global), then ``prepare`` on the gathered rewards and prompt ids, keeping this shard's rows of
        every per-sample extra (tensors whose first dimension is the global batch size)."""
        sl = self.shard(len(seeds))
        local_cond = None if cond is None else cond[sl]
        batch = method.collect(ctx, local_cond, list(seeds)[sl])
        if "tree" in batch.extras:  # tree rewards are per leaf and their groups span roots: not sharded yet
            raise NotImplementedError(f"{method.id} trains on branching trees, which run on one process only; "
                                      "run it without a multi-process launcher")
        dev = self.acc.device  # NCCL gathers device tensors; a black-box reward may return CPU ones
        rewards = self.acc.gather(batch.rewards.to(dev).contiguous()).to(batch.rewards.device)
        g_cond = None if cond is None else self.acc.gather(local_cond.to(dev).contiguous()).to(local_cond.device)
        view = Batch(rollout=batch.rollout, rows=batch.rows, rewards=rewards, cond=g_cond, extras=batch.extras,
                     row_data=batch.row_data)
        method.prepare(view, ctx)
        G, n_local = len(seeds), sl.stop - sl.start
        for k, v in view.extras.items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == G and G != n_local:
                view.extras[k] = v[sl]
        batch.extras, batch.rows, batch.row_data = view.extras, view.rows, view.row_data  # prepare may re-select
        return batch, rewards

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").cpu().tolist()

    def reduce_gradients(self, params) -> None:
        """Sum the gradients of `params` over processes (one all-reduce of the flattened tensor)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a picklable object)."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.acc.wait_for_everyone()


def make() -> Single:
    """The process group of this launch: ``Multi`` under a multi-process launcher, else ``Single``."""
    return Multi() if launched() else Single()

"""Multi-GPU training through accelerate (DDP) with gradient accumulation.

The contract: with the same global batch (G samples) and the same seeds, 1 process with A
accumulation steps, N processes with 1, and N with A give the same update. It follows from

- a contiguous shard of the global batch per process (``shard``), each sample with its own
  generator, so a sample's trajectory does not depend on where it is drawn (``rsmbench.core.rollout``);
- advantages from the *gathered* rewards and prompt ids (``collect``: DDPO gathers rewards across
  processes before its per-prompt statistics; a per-process group mean would change the update);
- equal-size micro-batches of rows (``micro_batches``), each loss a mean over its rows, divided
  by A (``Accelerator.backward``), and DDP's mean all-reduce over processes of the accumulated
  LoRA gradients (synchronised at the last micro-batch only: ``Accelerator.accumulate``).

LoRA gradients are synchronised because the backbone itself (with its peft adapter, the only
parameters that require grad) is wrapped in DDP and ``LatentNet`` calls it through that wrapper;
the reference (adapter off) and behaviour (snapshot) views call the bare backbone, so they never
trigger a reduction. This is the multi-GPU LoRA pitfall of ddpo-pytorch #10 / diffusers #4046
(anchors §2 item 2), checked by ``tests/test_ddp.py`` on two CPU processes (gloo).
"""
from __future__ import annotations

import torch
from accelerate import Accelerator

from rsmbench.core.method import Batch
from rsmbench.core.rsm import rsm_loss


def make_accelerator(grad_accum: int = 1, cpu: bool = False, mixed_precision: str = "no"):
    """An ``accelerate.Accelerator``; launched with ``accelerate launch --num_processes N`` it runs DDP."""
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=cpu, mixed_precision=mixed_precision)


def prepare(full, optimizer, accelerator):
    """Wrap the backbone of a ``fullscale.FullScale`` in DDP (when distributed) and the optimizer.
    Returns the prepared optimizer; ``full.net`` now calls the wrapped backbone."""
    wrapped = accelerator.prepare_model(full.net.backbone)
    object.__setattr__(full.net, "runner", wrapped)
    full.extra["ddp_model"] = wrapped
    return accelerator.prepare_optimizer(optimizer)


def shard(n_global: int, accelerator) -> slice:
    """This process's contiguous slice of a global batch of n_global samples (must divide evenly)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if n_global % world:
        raise ValueError(f"global batch {n_global} is not divisible by {world} processes")
    k = n_global // world
    return slice(rank * k, (rank + 1) * k)


def collect(method, ctx, cond: torch.Tensor, seeds, accelerator) -> Batch:
    """Collect this process's shard of the global batch (cond, seeds: global), then compute the
    method's ``prepare`` on the gathered rewards and prompt ids, and keep this shard's rows of every
    per-sample extra (tensors whose first dimension is the global batch size)."""
    sl = shard(len(seeds), accelerator)
    local_cond = None if cond is None else cond[sl]
    batch = method.collect(ctx, local_cond, list(seeds)[sl])
    dev = accelerator.device  # NCCL gathers device tensors; a black-box reward may return CPU ones
    rewards = accelerator.gather(batch.rewards.to(dev).contiguous())
    g_cond = None if cond is None else accelerator.gather(local_cond.to(dev).contiguous()).to(local_cond.device)
    view = Batch(rollout=batch.rollout, rows=batch.rows, rewards=rewards.to(batch.rewards.device), cond=g_cond,
                 extras=batch.extras)
    method.prepare(view, ctx)
    G = len(seeds)
    for k, v in view.extras.items():
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == G and G != sl.stop - sl.start:
            view.extras[k] = v[sl]
    batch.extras, batch.rows, batch.row_data = view.extras, view.rows, view.row_data  # prepare may re-select rows
    return batch


def micro_batches(batch: Batch, n: int) -> list[Batch]:
    """Split a batch's rows into n equal, contiguous micro-batches (extras and rollout shared,
    per-row data split with the rows)."""
    R = len(batch.rows)
    if R % n:
        raise ValueError(f"{R} training rows do not split into {n} equal micro-batches")
    k = R // n
    return [batch.select_rows(slice(j * k, (j + 1) * k)) for j in range(n)]


def accumulate_gradients(method, ctx, batch: Batch, accelerator, model, formulation: str = "original") -> list[float]:
    """Backward of the chosen formulation over A micro-batches (A = the accelerator's accumulation
    steps); the gradients are all-reduced at the last one. Returns the micro-batch losses.
    The caller steps and zeroes the (prepared) optimizer afterwards."""
    losses = []
    for mb in micro_batches(batch, accelerator.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            if formulation == "original":
                loss = method.original_loss(mb, ctx)
            elif formulation == "rsm":
                loss = rsm_loss(ctx.policy, ctx.ref, method.rsm_spec(mb, ctx))
            else:
                raise ValueError(f"formulation must be 'original' or 'rsm', got {formulation!r}")
            accelerator.backward(loss)
            losses.append(loss.item())
    return losses

"""Resumable run state: every ``train.checkpoint_every`` iterations the trained weights, the
optimizer, the counters and the not-yet-logged metrics are written atomically, so a run killed
anywhere resumes into the same MLflow run with neither a gap nor a duplicate in its history."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rsmbench.run.accounting import Counters


def save_state(path: Path, net, opt, it: int, counters: Counters, pending: list, state: dict | None = None,
               method_state: dict | None = None) -> None:
    """Atomic run checkpoint: net (safetensors; `state` instead of the whole net's state dict when
    given: the LoRA weights at full scale) + optimizer/counters/pending metrics and the method's own
    cross-iteration state (``Method.state_dict``; torch, weights-only)."""
    path.mkdir(parents=True, exist_ok=True)
    state = net.state_dict() if state is None else state
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "net.tmp"))
    torch.save({"opt": opt.state_dict(), "iteration": it, "counters": vars(counters), "pending": pending,
                "method": method_state or {}}, path / "state.tmp")
    os.replace(path / "net.tmp", path / "net.safetensors")
    os.replace(path / "state.tmp", path / "state.pt")


def load_state(path: Path):
    if not (path / "state.pt").is_file() or not (path / "net.safetensors").is_file():
        return None
    st = torch.load(path / "state.pt", weights_only=True)
    st["net"] = load_file(str(path / "net.safetensors"))
    return st

"""Hash-checked checkpoints of the tiny networks of ``rsmbench.core.models``.

``<name>.safetensors`` holds the weights, ``<name>.json`` the config (arch, prediction and the
``build_net`` kwargs, plus whatever the writer adds) and the sha256 of the safetensors file.
``load_checkpoint`` refuses a missing or mismatching file with one line naming the fix
(``rsmbench pretrain --task NAME``)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rsmbench.core.models import build_net
from rsmbench.errors import CheckpointError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(net: torch.nn.Module, path, config: dict) -> str:
    """Write net's weights (safetensors) and a JSON sidecar with `config` and the file's sha256.
    `config` must hold arch, prediction and net (the build_net kwargs). Returns the hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    digest = sha256(path)
    meta = {"format": "rsmbench-checkpoint-1", "file": path.name, "sha256": digest, "config": config}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return digest


def _sidecar(path: Path, task: str | None) -> dict:
    fix = f"run `rsmbench pretrain --task {task}`" if task else "run `rsmbench pretrain --task NAME`"
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"missing base checkpoint {path} (or its .json); {fix}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint sidecar {meta_path} ({e}); {fix}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint sidecar {meta_path} holds no config; {fix}")
    return meta


def checkpoint_sha256(path, task: str | None = None) -> str:
    """The sha256 a checkpoint's sidecar records (cheap: the file is hashed on load)."""
    return _sidecar(Path(path), task)["sha256"]


def load_checkpoint(path, task: str | None = None):
    """(net, config) from a checkpoint written by ``save_checkpoint``, after checking its hash."""
    path = Path(path)
    meta = _sidecar(path, task)
    if sha256(path) != meta.get("sha256"):
        fix = f"run `rsmbench pretrain --task {task or 'NAME'}`"
        raise CheckpointError(f"checkpoint {path} does not match the sha256 in {path.with_suffix('.json').name} "
                              f"(corrupt or edited); {fix}")
    cfg = meta["config"]
    net = build_net(cfg["arch"], cfg["prediction"], dtype=torch.float32, **cfg["net"])
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net, cfg

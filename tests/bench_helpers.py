"""Shared setup of the bench tests: random-init gmm checkpoints in a tmp dir and tiny budgets."""
from rsmbench.core import checkpoints
from rsmbench.core.models import build_net

NET = dict(dim=2, hidden=128, depth=3, temb=32, num_classes=0)


def tiny_overrides(tmp_path, iterations: int = 6, batch: int = 8) -> list[str]:
    """Overrides for a seconds-long gmm bench on the flow process (checkpoints written here)."""
    out = []
    for kind, pred in (("flow", "v"), ("diffusion", "epsilon")):
        path = tmp_path / f"gmm_{kind}.safetensors"
        if not path.exists():
            checkpoints.save_checkpoint(build_net("mlp", pred, seed=3, **NET), path,
                                     {"arch": "mlp", "prediction": pred, "net": NET, "task": "gmm"})
        out.append(f"processes.{kind}.model.checkpoint={path}")
    return out + [f"budget.reward_queries={iterations * batch}", f"train.batch_per_prompt={batch}",
                  "eval.num_samples=32", "eval.jstar_samples=0", "eval.points=2", "bench.processes=[flow]",
                  "train.checkpoint_every=1"]

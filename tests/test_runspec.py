"""The run spec is the one description of a run: everything it executes is in its hash, so a changed
``data:`` section or a re-pretrained base checkpoint is a new run, never a skipped FINISHED one."""
import os

from mlflow.tracking import MlflowClient

from rsmbench.cli import main
from rsmbench.core import checkpoints
from rsmbench.core.models import build_net
from rsmbench.run import tasks
from rsmbench.run.runspec import config_hash, eval_spec, run_spec
from tests.bench_helpers import NET, tiny_overrides


def _hash(tmp_path, *extra):
    cfg = tasks.load("gmm", tiny_overrides(tmp_path) + list(extra))
    return config_hash(run_spec(cfg, "grpo", "rsm", "flow", 0))


def test_spec_holds_data_and_checkpoint_hash_and_the_eval_part(tmp_path):
    cfg = tasks.load("gmm", tiny_overrides(tmp_path))
    spec = run_spec(cfg, "grpo", "rsm", "flow", 0)
    assert spec["data"]["source"] == "gmm" and len(spec["model"]["checkpoint_sha256"]) == 64
    ev = eval_spec(cfg, "flow")
    assert all(spec[k] == v for k, v in ev.items() if k != "train")  # a run spec contains its eval spec
    assert all(spec["train"][k] == v for k, v in ev["train"].items())


def test_data_section_and_checkpoint_bytes_change_the_hash(tmp_path):
    h0 = _hash(tmp_path)
    assert _hash(tmp_path) == h0  # deterministic
    assert _hash(tmp_path, "data.cfg.stds=1.5") != h0
    assert _hash(tmp_path, "train.lr=1e-2") != h0
    path = tmp_path / "gmm_flow.safetensors"  # re-pretrain: new bytes, new sidecar hash
    checkpoints.save_checkpoint(build_net("mlp", "v", seed=4, **NET), path,
                                {"arch": "mlp", "prediction": "v", "net": NET, "task": "gmm"})
    assert _hash(tmp_path) != h0


def _bench(tmp_path):
    return main(["bench", "--task", "gmm", "--methods", "grpo", "--seeds", "1", "--no-progress",
                 "--report-dir", str(tmp_path / "report"), *tiny_overrides(tmp_path, iterations=2)])


def test_bench_reruns_after_a_repretrained_checkpoint(tmp_path):
    assert _bench(tmp_path) == 0
    assert _bench(tmp_path) == 0  # skipped: same spec
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("gmm").experiment_id
    assert len(c.search_runs([exp])) == 1
    checkpoints.save_checkpoint(build_net("mlp", "v", seed=5, **NET), tmp_path / "gmm_flow.safetensors",
                                {"arch": "mlp", "prediction": "v", "net": NET, "task": "gmm"})
    assert _bench(tmp_path) == 0
    runs = c.search_runs([exp])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["config_hash"] for r in runs}) == 2

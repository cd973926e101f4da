"""`rsmbench tune`: the grid on the tuning seeds, the argmax of the selection metric, the tuned file,
and the bench applying it (not with --untuned)."""
import os
import shutil

import yaml
from mlflow.tracking import MlflowClient

from rsmbench.cli import main
from rsmbench.run import tasks, tuning
from tests.bench_helpers import tiny_overrides


def _store():
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_tune_selects_the_argmax_on_tuning_seeds_and_bench_applies_it(tmp_path, monkeypatch, capsys):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    shutil.copy(tasks.ROOT / "tasks" / "gmm.yaml", task_dir / "gmm.yaml")
    monkeypatch.setenv("RSMBENCH_TASKS", str(task_dir))
    fast = tiny_overrides(tmp_path, iterations=3)
    assert main(["tune", "--task", "gmm", "--methods", "grpo,reinforce_kl", "--seeds", "1", "--lr-grid", "1e-3,3e-2",
                 "--workers", "1", "--no-progress", *fast]) == 0
    data = yaml.safe_load(tuning.tuned_path("gmm").read_text())
    assert data["protocol"]["metric"] == "eval/J" and data["protocol"]["seeds"] == [tuning.SEED_OFFSET]
    c = _store()
    runs = c.search_runs([c.get_experiment_by_name("gmm-tune").experiment_id])
    points = [r for r in runs if r.data.tags.get("tune") == "point"]
    parents = {r.info.run_id for r in runs if r.data.tags.get("tune") == "parent"}
    assert len(points) == 4 and len(parents) == 2  # 2 methods × 2 learning rates × 1 seed, β fixed by the task
    assert all(int(r.data.tags["seed"]) >= tuning.SEED_OFFSET for r in points)  # never an evaluation seed
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in points)
    for key in ("grpo/flow", "reinforce_kl/flow"):
        method = key.split("/")[0]
        score = {float(r.data.params["train.lr"]): r.data.metrics["eval/J"]
                 for r in points if r.data.tags["method"] == method}
        assert data["selected"][key]["lr"] == max(score, key=score.get)
        assert sorted(p["lr"] for p in data["results"][key]) == [1e-3, 3e-2]
    # the bench applies the tuned learning rates; --untuned runs the task's own
    for extra, expect in (([], data["selected"]["grpo/flow"]["lr"]), (["--untuned"], 3e-3)):
        assert main(["bench", "--task", "gmm", "--methods", "grpo", "--seeds", "1", "--workers", "1", "--no-progress",
                     "--report-dir", str(tmp_path / "report"), *extra, *fast]) == 0
        bench_runs = c.search_runs([c.get_experiment_by_name("gmm").experiment_id],
                                   f"tags.tuned = '{'false' if extra else 'true'}'")
        assert len(bench_runs) == 1 and float(bench_runs[0].data.params["train.lr"]) == expect
        assert bench_runs[0].data.tags["seed"] == "0"

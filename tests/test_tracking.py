"""MLflow under concurrency: four bench processes on one sqlite store at once."""
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.bench_helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_four_bench_processes_share_one_store(tmp_path):
    ov = tiny_overrides(tmp_path, iterations=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # p0/p1 and p2/p3 plan the same runs, so run claiming is exercised as well as sqlite locking.
    plans = [["--formulation", "both", "--seeds", "1"], ["--formulation", "both", "--seeds", "1"],
             ["--formulation", "rsm", "--seeds", "2"], ["--formulation", "rsm", "--seeds", "2"]]
    procs = [subprocess.Popen([sys.executable, "-m", "rsmbench.cli", "bench", "--task", "gmm", "--methods",
                               "reinforce_kl", "--no-progress", "--report-dir", str(tmp_path / f"rep{k}"),
                               *p, *ov], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, p in enumerate(plans)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1].decode()[-2000:] for o in outs]
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("gmm").experiment_id], max_results=100)
    keys = sorted((r.data.tags["formulation"], r.data.tags["seed"]) for r in runs)
    assert keys == [("original", "0"), ("rsm", "0"), ("rsm", "1")]  # no lost, no duplicated runs
    for r in runs:
        assert r.info.status == "FINISHED"
        for key in ("iteration", "train/reward_mean"):
            steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, key))
            assert steps == (list(range(4)) if key == "iteration" else [1, 2, 3]), (key, steps)

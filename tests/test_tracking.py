"""MLflow under concurrency (four bench processes on one sqlite store at once), and what the MLflow
UI is given: the experiment kind, descriptions, seed groups and the saved runs-table view."""
import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from rsmbench.core import method as registry
from rsmbench.run import tracking
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


# ---- how the MLflow UI shows a store: kind, descriptions, seed groups, the saved runs view ----------------
def _rc(seed=0, **kw):
    return {"task": "gmm", "profile": "tiny", "method": "ddpo", "formulation": "original", "process": "diffusion",
            "seed": seed, "hp": {"lr": 1e-3}, "budget": {"mode": "matched", "reward_queries": 3840}, **kw}


def test_config_group_is_shared_by_seeds_only():
    g = tracking.config_group(_rc(0))
    assert g == tracking.config_group(_rc(7)) and g.startswith("ddpo-original-diffusion ")
    assert g != tracking.config_group(_rc(0, hp={"lr": 2e-3}))  # another sweep level is another group
    assert g != tracking.config_group(_rc(0, formulation="rsm"))


def test_run_description_says_what_ran_and_what_the_method_is():
    d = tracking.run_description(_rc(3), registry.get("ddpo"))
    first, _, summary = d.partition("  \n")
    for part in ("**ddpo**", "original formulation (the authors' loss)", "diffusion process", "seed 3",
                 "budget 3840 reward queries (matched)"):
        assert part in first, (part, first)
    assert summary.startswith("DDPO: denoising diffusion policy optimisation"), summary


def test_experiment_is_model_training_with_description_and_saved_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    c = MlflowClient(uri)
    old = c.create_experiment("old")  # made before these tags existed
    t = tracking.Tracker(uri)
    exp = t.experiment("gmm", description="2-D Gaussian mixture")
    assert t.experiment("old") == old
    for eid in (exp, old):
        tags = c.get_experiment(eid).tags
        assert tags[tracking.KIND_TAG] == "custom_model_development"
        view = json.loads(tags[tracking.VIEW_TAG])
        assert view["name"] and isinstance(view["createdAt"], int)
        state = json.loads(view["state"])
        assert state["selectedColumns"][:4] == ["metrics.`eval/reward_mean`", "metrics.`eval/kl_ref`",
                                                "metrics.`eval/J_gap`", "metrics.`train/reward_queries`"]
        assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "config_group"}]
    assert c.get_experiment(exp).tags[tracking.NOTE_TAG] == "2-D Gaussian mixture"
    assert tracking.NOTE_TAG not in c.get_experiment(old).tags
    c.set_experiment_tag(exp, tracking.NOTE_TAG, "edited in the UI")
    before = c.get_experiment(exp).tags[tracking.VIEW_TAG]
    assert t.experiment("gmm", description="2-D Gaussian mixture") == exp
    tags = c.get_experiment(exp).tags
    assert tags[tracking.NOTE_TAG] == "edited in the UI"  # a user's description is kept
    assert tags[tracking.VIEW_TAG] == before  # an unchanged view is not rewritten
    run = t.create_run(exp, "ddpo-original-diffusion-s0", {"seed": 0}, description="what ran")
    assert c.get_run(run).data.tags[tracking.NOTE_TAG] == "what ran"


def test_ui_url(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.ui_url("3", 5055) == ("http://127.0.0.1:5055/#/experiments/3/runs"
                                          "?workflowType=machine_learning&viewStateShareKey=rsmbench")
    assert tracking.ui_url("3", 6000, run_id="ab") == \
        "http://127.0.0.1:6000/#/experiments/3/runs/ab?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000/")  # a tracking server is its own UI
    assert tracking.ui_url().startswith("http://tracker:5000/#/experiments?workflowType=machine_learning")

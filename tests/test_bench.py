"""The bench runner end to end into a temporary MLflow store (tests/conftest.py points
MLFLOW_TRACKING_URI and RSMBENCH_RESULTS at tmp_path): runs, params, metrics, artifacts; skip on
re-run; resume after a kill with no gap or duplicate; bad inputs; a NaN reward."""
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import rewards
from rsmbench.cli import main
from rsmbench.run import budget, tracking
from tests.bench_helpers import tiny_overrides

METHODS = "reinforce_kl,grpo"


def _bench(tmp_path, *extra, methods=METHODS, formulation="rsm", workers=1):
    return main(["bench", "--task", "gmm", "--methods", methods, "--seeds", "1", "--formulation", formulation,
                 "--workers", str(workers), "--no-progress", "--report-dir", str(tmp_path / "report"),
                 *tiny_overrides(tmp_path), *extra])


def _runs():
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("gmm")
    return c, ([] if exp is None else c.search_runs([exp.experiment_id], max_results=1000))


def _steps(c, run_id, key="iteration"):
    return [m.step for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_two_methods_log_everything_then_skip(tmp_path, capsys):
    assert _bench(tmp_path) == 0
    c, runs = _runs()
    assert sorted(r.data.tags["method"] for r in runs) == ["grpo", "reinforce_kl"]
    for r in runs:
        assert r.info.status == "FINISHED"
        p, t, m = r.data.params, r.data.tags, r.data.metrics
        assert p["method"] == t["method"] and p["formulation"] == "rsm" and p["budget.reward_queries"] == "48"
        assert p["eval.seed_start"] == "900000000" and p["eval.sampler"] == "sde"  # pinned protocol logged
        assert {"git_commit", "version.torch", "version.mlflow", "profile", "method_family",
                "equivalence_kind", "config_hash"} <= set(t)
        assert _steps(c, r.info.run_id) == list(range(7))  # eval at 0, iterations 1..6
        assert _steps(c, r.info.run_id, "train/reward_mean") == list(range(1, 7))
        assert [h.value for h in sorted(c.get_metric_history(r.info.run_id, "train/reward_queries"),
                                        key=lambda h: h.step)] == [8.0 * k for k in range(1, 7)]
        assert _steps(c, r.info.run_id, "eval/J_gap") == [0, 3, 6]
        for key in ("train/loss", "train/grad_norm", "train/approx_kl", "train/nfe", "train/wall_time",
                    "eval/kl_ref", "eval/diversity", "eval/prior_frechet", "eval/sw_to_target"):
            assert key in m, key
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert "config.json" in arts
        pngs = [a.path for a in c.list_artifacts(r.info.run_id, "samples")]
        assert sorted(pngs) == [f"samples/samples_{k}.png" for k in ("000006", "first_vs_last")]
    out = capsys.readouterr().out
    assert "reinforce_kl" in out and "J-gap" in out
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| grpo (rsm, flow) | 1 | 48 (48) |" in summary and "| reinforce_kl (rsm, flow) | 1 | 48 (48) |" in summary
    assert "- flow base model (iteration 0 of every run): reward " in summary and "3.768 (exact mixture)" in summary
    before = {r.info.run_id: _steps(c, r.info.run_id) for r in runs}
    assert _bench(tmp_path) == 0  # second invocation: nothing re-run
    c, runs2 = _runs()
    assert {r.info.run_id: _steps(c, r.info.run_id) for r in runs2} == before


def test_killed_run_resumes_without_gap_or_duplicate(tmp_path, monkeypatch):
    real = tracking.Tracker.log_metrics
    state = {"armed": True}

    def dying(self, run_id, metrics, step):  # die after the checkpoint of step 3, before its metrics
        if step == 3 and state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt
        return real(self, run_id, metrics, step)

    monkeypatch.setattr(tracking.Tracker, "log_metrics", dying)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, methods="reinforce_kl")
    c, runs = _runs()
    assert len(runs) == 1 and runs[0].info.status == "RUNNING" and _steps(c, runs[0].info.run_id) == [0, 1, 2]
    assert _bench(tmp_path, methods="reinforce_kl") == 0
    c, runs = _runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in ("iteration", "train/loss", "train/reward_queries"):
        steps = _steps(c, runs[0].info.run_id, key)
        assert steps == sorted(set(steps)) and steps[-1] == 6 and len(steps) == (7 if key == "iteration" else 6)


def test_overspent_run_is_failed_and_a_rerun_trains_it_afresh(tmp_path, monkeypatch):
    """Overspending is found after the run's last checkpoint: resuming that checkpoint would only fail
    again (its counters are over the budget), so the checkpoint is dropped and a re-run trains from the
    start (this happened to AlignProp's shapes runs after the row-chunking fix)."""
    from rsmbench.run import bench as B
    from rsmbench.run.train import Overspent

    real, iterations = B.train_run, []

    def overspent(*a, **k):
        real(*a, **k)
        raise Overspent("spent 99 reward queries, more than 1 % over the budget 48")

    monkeypatch.setattr(B, "train_run", overspent)
    _bench(tmp_path, methods="reinforce_kl")
    c, runs = _runs()
    assert runs[0].info.status == "FAILED" and "Overspent" in runs[0].data.tags["error"]
    (ckpt,) = Path(os.environ["RSMBENCH_RESULTS"], "runs").iterdir()
    assert (ckpt / "net.safetensors").exists() and not (ckpt / "state.pt").exists()
    def counting(rc, log_metrics, log_artifact, ckpt, on_iteration, **k):
        def on_it(it, metrics):
            iterations.append(it)
            on_iteration(it, metrics)
        return real(rc, log_metrics, log_artifact, ckpt, on_it, **k)

    monkeypatch.setattr(B, "train_run", counting)
    assert _bench(tmp_path, methods="reinforce_kl") == 0
    c, runs = _runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "error" not in runs[0].data.tags
    assert iterations == [1, 2, 3, 4, 5, 6]  # trained from the start, not resumed at its end


@pytest.mark.parametrize("argv,needle", [
    (["--task", "nope"], "unknown task 'nope'; choose from"),
    (["--task", "gmm", "--profile", "huge"], "unknown profile 'huge'; choose from tiny, sd15, sd35"),
    (["--task", "gmm", "--profile", "sd35"], "has no 'sd35' profile"),
    (["--task", "gmm", "--methods", "nope"], "unknown method 'nope'; choose from all,"),
    (["--task", "gmm", "--methods", "ddpo", "bench.processes=[flow]"], "does not apply to task 'gmm'"),
    (["--task", "gmm", "train.lr"], "malformed override 'train.lr'"),
    (["--task", "gmm", "train.bogus=1"], "train: unknown key 'bogus'; valid keys: batch_per_prompt"),
    (["--task", "gmm", "--formulation", "neither"], "unknown formulation 'neither'"),
])
def test_bad_input_one_line_exit_2_nothing_created(argv, needle, capsys, tmp_path):
    assert main(["bench", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    db = Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):])
    assert not db.exists() and not Path(os.environ["RSMBENCH_RESULTS"]).exists()


class _NaNOnThirdCall:
    differentiable = True
    calls = 0

    def __init__(self, **_):
        self.title = "linear, NaN on its third call"

    def __call__(self, x, cond=None):
        type(self).calls += 1
        r = -0.5 * x[:, 0] + 3.0
        return r * float("nan") if type(self).calls == 3 else r

    def features(self, x):
        return x


def _count_from_training(monkeypatch, cls):
    """The budget planner probes each method's cost with the reward: count the reward's calls from
    the first training run on (reset after every plan)."""
    real = budget.plan

    def plan(*a, **k):
        out = real(*a, **k)
        cls.calls = 0
        return out

    monkeypatch.setattr(budget, "plan", plan)
    return real


def test_nan_reward_stops_that_run_as_diverged_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(rewards.REWARDS, "test_nan", _NaNOnThirdCall)
    real_plan = _count_from_training(monkeypatch, _NaNOnThirdCall)
    assert _bench(tmp_path, "reward.name=test_nan") == 0  # a divergence is a result, not an error
    err = capsys.readouterr().err
    assert "reward is NaN at iteration 2" in err
    c, runs = _runs()
    status = {r.data.tags["method"]: r.info.status for r in runs}
    assert status == {"grpo": "FINISHED", "reinforce_kl": "FAILED"} or \
        status == {"grpo": "FAILED", "reinforce_kl": "FINISHED"}
    failed = [r for r in runs if r.info.status == "FAILED"][0]
    assert "NaN" in failed.data.tags["error"] and failed.data.tags["diverged"] == "2"
    assert _steps(c, failed.info.run_id) == [0, 1]  # the history up to the last sane iteration is kept
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "diverged at iteration 2 (1 of 1 seeds)" in summary
    # a re-run reports the seeded divergence without re-running it (the run is untouched)
    assert _bench(tmp_path, "reward.name=test_nan") == 0
    assert "not re-run; --retry-failed re-runs it" in capsys.readouterr().err
    c, runs1 = _runs()
    assert len(runs1) == 2 and c.get_run(failed.info.run_id).info.end_time == failed.info.end_time
    # --retry-failed resumes it into the same run (here it succeeds: the reward's NaN was its 3rd call)
    monkeypatch.setattr(budget, "plan", real_plan)
    _NaNOnThirdCall.calls = 3  # that call is spent
    assert main(["bench", "--task", "gmm", "--methods", failed.data.tags["method"], "--seeds", "1", "--workers", "1",
                 "--formulation", "rsm", "--no-progress", "--retry-failed", "--report-dir", str(tmp_path / "report"),
                 *tiny_overrides(tmp_path), "reward.name=test_nan"]) == 0
    c, runs2 = _runs()
    again = c.get_run(failed.info.run_id)
    assert len(runs2) == 2 and again.info.status == "FINISHED"
    assert "diverged" not in again.data.tags and "error" not in again.data.tags


class _Unbounded(_NaNOnThirdCall):
    """Sane for three calls (the iteration-0 eval, iterations 1 and 2), then 1000× larger."""

    def __call__(self, x, cond=None):
        type(self).calls += 1
        r = -0.5 * x[:, 0] + 3.0
        return r * 1000.0 if type(self).calls >= 4 else r


def test_reward_out_of_range_is_diverged_at_that_iteration_never_a_number(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(rewards.REWARDS, "test_unbounded", _Unbounded)
    _count_from_training(monkeypatch, _Unbounded)
    assert _bench(tmp_path, "reward.name=test_unbounded", methods="reinforce_kl") == 0
    assert "left the task's range of reward at iteration 3" in capsys.readouterr().err
    c, runs = _runs()
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["diverged"] == "3"
    row = [ln for ln in (tmp_path / "report" / "summary.md").read_text().splitlines() if "reinforce_kl" in ln][0]
    assert "diverged at iteration 3" in row and "**" not in row and "3000" not in row and "e+" not in row


def test_parallel_rerun_that_skips_everything_spawns_no_worker(tmp_path, monkeypatch, capsys):
    """Runs finished before are answered from the store: with --workers 2 no process is started."""
    from rsmbench.run import bench as bench_mod

    assert _bench(tmp_path) == 0
    capsys.readouterr()

    class _NoPool:
        def __init__(self, *a, **k):
            raise AssertionError("a worker process was started for runs that are all done")

    monkeypatch.setattr(bench_mod, "ProcessPoolExecutor", _NoPool)
    assert _bench(tmp_path, workers=2) == 0
    assert "reinforce_kl (rsm, flow)" in capsys.readouterr().out  # the summary is still written and shown

"""Sweeps: Cartesian expansion with validity reasons, a two-point run that resumes, and the Ray launcher."""
import textwrap

import pytest

from rsmbench.cli import main
from rsmbench.run import sweep, tracking

FAST = ["budget.reward_queries=64", "train.batch_per_prompt=32", "eval.num_samples=64", "eval.points=1"]


def _write(tmp_path, body: str):
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def test_dry_run_expands_product_and_rejects_invalid_points(tmp_path, capsys):
    body = f"""
        name: t
        tasks: [gmm, compressibility]
        seeds: [0, 1, 2]
        overrides: {FAST + ["bench.processes=[flow,diffusion]"]}
        axes:
          est:
            fo: {{method: rsm_fo}}
            zo: {{method: reinforce_kl}}
            two: {{method: grpo, hp: {{beta: 0.0}}}}
          temporal:
            own: {{}}
            snr: {{hp: {{temporal: snr}}}}
    """
    p = _write(tmp_path, body)
    pts = sweep.expand(sweep.load(p))
    # 2 tasks × 3 estimator levels × 2 temporal levels × 3 seeds × (processes the method and task share)
    procs = {"gmm": 2, "compressibility": 2}
    assert len(pts) == sum(3 * 2 * 3 * procs[t] for t in procs)
    reasons = {(pt.task, pt.method, pt.levels["temporal"]): pt.skip for pt in pts}
    assert "not differentiable" in reasons[("compressibility", "rsm_fo", "own")]
    assert reasons[("gmm", "rsm_fo", "own")] == ""
    assert main(["sweep", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    valid = sum(not pt.skip for pt in pts)
    assert f"{valid} runs to do ({len(pts) - valid} skipped)" in out
    assert f"estimated budget {64 * valid} reward queries" in out
    # a value outside a hyperparameter's declared choices is the file's error, not a skipped point
    bad = _write(tmp_path, body.replace("temporal: snr", "temporal: nonsense"))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "[est=fo,temporal=snr] hp.temporal must be one of 'own'" in err and len(err.splitlines()) == 1, err


def test_malformed_sweep_is_one_line_exit_2(tmp_path, capsys):
    p = _write(tmp_path, "name: x\ntasks: [gmm]\naxes: {a: {}}\n")
    assert main(["sweep", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "non-empty mapping of levels" in err and len(err.splitlines()) == 1
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    p2 = _write(tmp_path, f"name: y\ntasks: [gmm]\noverrides: {FAST}\naxes:\n"
                          "  a: {x: {method: grpo}, y: {method: ddpo}}\n  b: {z: {method: grpo}}\n")
    pts = sweep.expand(sweep.load(p2))
    assert all("name a method" in pt.skip for pt in pts)


def _two_point(tmp_path):
    return _write(tmp_path, f"""
        name: two
        tasks: [gmm]
        seeds: [0]
        overrides: {FAST + ["bench.processes=[flow]"]}
        axes:
          method:
            zo: {{method: reinforce_kl, hp: {{beta: 1.0}}}}
          temporal:
            own: {{}}
            uniform: {{hp: {{temporal: uniform}}}}
    """)


def test_two_point_sweep_runs_tags_and_resumes(tmp_path, capsys):
    p = _two_point(tmp_path)
    assert main(["sweep", str(p)]) == 0
    out = capsys.readouterr().out
    assert sum(line.split()[0] == "new" for line in out.splitlines()[1:]) == 2
    tr = tracking.Tracker()
    runs = tr.runs(tr.experiment("gmm"), "tags.sweep = 'two'")
    assert sorted(r.data.tags["sweep.temporal"] for r in runs) == ["own", "uniform"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert main(["sweep", str(p)]) == 0  # resume: both finished, both skipped
    assert sum(line.split()[0] == "skipped" for line in capsys.readouterr().out.splitlines()[1:]) == 2
    assert len(tr.runs(tr.experiment("gmm"), "tags.sweep = 'two'")) == 2


@pytest.mark.slow
def test_ray_launcher_against_a_local_ray_instance(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        p = _two_point(tmp_path)
        assert main(["sweep", str(p), "--launcher", "ray", "--cpus-per-point", "1"]) == 0
        assert sum(line.split()[0] == "new" for line in capsys.readouterr().out.splitlines()[1:]) == 2
    finally:
        ray.shutdown()
    tr = tracking.Tracker()
    assert len(tr.runs(tr.experiment("gmm"), "tags.sweep = 'two'")) == 2


def test_sweep_points_are_planned_as_the_bench_plans_them(tmp_path):
    """A sweep point of a method that costs 11 reward queries per sample (VGG-Flow: a reward gradient per
    trained row) at a budget of 640 is one cut iteration of 58 samples (638 queries), not a full
    iteration of 64 (704: the run would stop as overspent)."""
    p = _write(tmp_path, """
        name: cut
        tasks: [gmm]
        seeds: [0]
        overrides: [budget.reward_queries=640, eval.points=1]
        axes:
          estimator:
            fo_current_state: {method: vgg_flow}
    """)
    cfg = sweep.load(p)
    (pt,) = sweep.expand(cfg)
    _, rc = sweep.run_config(pt, cfg)
    sched = rc["budget"]["schedule"]
    assert sched["queries_per_sample"] == 11.0
    assert sched["iterations"] == 1 and sched["last_samples"] == 58 and sched["planned_queries"] == 638.0

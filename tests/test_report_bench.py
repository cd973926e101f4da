"""The report on real bench runs (tiny gmm): the same intervals as the bench's summary.md for the same
runs, and a run diverged by a reward that grows without bound is diverged in the report too."""
import os

from mlflow.tracking import MlflowClient

import rewards
from rsmbench.analysis import report
from rsmbench.cli import main
from tests.bench_helpers import tiny_overrides
from tests.test_bench import _count_from_training, _Unbounded
from tests.test_report import _table, _table_text


def _bench(tmp_path, methods, seeds, *extra):
    return main(["bench", "--task", "gmm", "--methods", methods, "--seeds", str(seeds), "--formulation", "rsm",
                 "--workers", "1", "--no-progress", "--report-dir", str(tmp_path / "summary"),
                 *tiny_overrides(tmp_path), *extra])


def test_report_matches_the_bench_summary_and_shows_a_real_divergence(tmp_path, monkeypatch):
    assert _bench(tmp_path, "grpo,reinforce_kl", 2) == 0
    summ = {r["configuration"]: r for r in _table_text((tmp_path / "summary" / "summary.md").read_text())}
    monkeypatch.setitem(rewards.REWARDS, "test_unbounded", _Unbounded)
    _count_from_training(monkeypatch, _Unbounded)
    assert _bench(tmp_path, "reinforce_kl", 1, "reward.name=test_unbounded") == 0
    out = tmp_path / "rep"
    report.build(out, task="gmm", analyses=False)
    rep = _table(out / "results_gmm.md")
    sane = {r["configuration"]: r for r in rep if not r["reward"].startswith("diverged")}
    diverged = [r for r in rep if r["reward"].startswith("diverged")]
    assert len(sane) == 2 and len(diverged) == 1
    for name, s in summ.items():  # the summary's rows, found in the report under the same method
        r = next(v for k, v in sane.items() if k.split(" ")[0] == name.split(" ")[0])
        assert r["seeds"] == s["seeds"] == "2"
        for col in ("reward", "KL", "J", "J-gap", "J-gap exact", "SW→p*", "diversity", "prior FD"):
            assert r[col].strip("*") == s[col], (name, col, r[col], s[col])
    d = diverged[0]
    assert d["configuration"].startswith("reinforce_kl (rsm, flow) [")  # its reward differs: its own row
    assert d["reward"] == "diverged at iteration 3 (1 of 1 seeds)"
    assert "**" not in "".join(d.values()) and "3000" not in "".join(d.values())
    text = (out / "index.md").read_text()
    assert "ending in ✕" in text  # the efficiency curves draw it up to its divergence
    # its sample grids: iteration 0 beside its last eval (the one where it diverged)
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("gmm").experiment_id], "tags.diverged = '3'")
    assert len(runs) == 1
    arts = {a.path for a in c.list_artifacts(runs[0].info.run_id, "samples")}
    assert "samples/samples_first_vs_last.png" in arts and "samples/samples_000003.png" in arts, arts

"""The paired test against the base model: ``stats.paired_difference`` (the pigeonhole bootstrap over seeds and eval
samples) and the summary's ``Δ base`` column and ``> base`` mark built on it from the runs' ``eval_outcomes.json``."""
import json
import re

import numpy as np
import pytest

from rsmbench.analysis import stats, summary
from rsmbench.run import runspec, tracking
from rsmbench.run.evaluate import ARTIFACTS, OUTCOMES

STRATA = ["a"] * 4 + ["b"] * 4 + ["c"] * 2  # unequal strata: the macro mean differs from the sample mean


def test_the_point_is_the_macro_mean_of_the_paired_change():
    """D = mean over strata of the mean change: a sample mean (or a sum) in its place gives another value."""
    base = np.zeros((2, 10))
    final = np.zeros((2, 10))
    final[:, 8:] = 1.0  # both samples of stratum c pass after training, in both seeds
    final[0, 0] = 1.0   # one sample of stratum a, in seed 0 only
    point, lo, hi = stats.paired_difference(final, base, STRATA, n_resamples=2000)
    assert point == pytest.approx((0.5 * 0.25 + 0.0 + 1.0) / 3, abs=1e-15)  # not the sample mean 5/20 = 0.25
    assert lo <= point <= hi


def test_the_ci_covers_the_eval_samples_not_only_the_seeds():
    """Three seeds that gain the same one sample per stratum agree exactly, so a CI over seeds alone has no width.
    Resampled over the samples too, the CI reaches 0; a gain on every sample clears it."""
    base = np.tile([0.0, 0, 0, 1, 0, 0, 0, 1, 0, 1], (3, 1))
    one = base.copy()
    one[:, [0, 4]] = 1.0  # one more pass in strata a and b, the same in every seed
    assert stats.interval(one.mean(axis=1))[1:] == (0.5, 0.5)  # seeds alone: zero width
    _, lo, hi = stats.paired_difference(one, base, STRATA)
    assert lo == 0.0 and hi > 0.1
    every = np.ones_like(base)
    point, lo, hi = stats.paired_difference(every, base, STRATA)
    assert lo > 0.3 and point == pytest.approx(((3 / 4) + (3 / 4) + (1 / 2)) / 3, abs=1e-15)


def test_seed_spread_widens_the_ci():
    """Seeds that disagree (one gains every sample, two gain none) give a CI that reaches 0, where seeds that agree
    on the same mean gain do not."""
    base = np.zeros((3, 10))
    spread = base.copy()
    spread[0] = 1.0
    agree = base.copy()
    agree[:, ::3] = 1.0
    agree[:, [8, 9]] = [1.0, 0.0]
    assert stats.paired_difference(spread, base, STRATA)[1] == 0.0
    assert stats.paired_difference(agree, base, STRATA)[1] > 0.0


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="seeds, samples"):
        stats.paired_difference(np.zeros((2, 10)), np.zeros((2, 9)), STRATA)


def _shapes_run(tr, exp, method: str, seed: int, base: list, final: list, strata: list, tmp_path):
    """One run as the bench logs a shapes run: its tags, the macro accuracy at iterations 0 and 5, and its
    eval_outcomes.json among its artifacts."""
    spec = {"task": "shapes", "method": method, "formulation": "original", "process": "flow", "seed": seed,
            "train": {"lr": 1e-3}, "budget": {"reward_queries": 210, "mode": "matched"}, "hp": {}}
    rid = tr.create_run(exp, f"{method}-s{seed}", {
        "config_hash": runspec.config_hash(spec), tracking.GROUP_TAG: tracking.config_group(spec), "method": method,
        "formulation": "original", "process": "flow", "seed": seed, "task": "shapes"})
    tr.log_params(rid, tracking.flatten(spec))
    for step, scores in ((0, base), (5, final)):
        acc = float(np.mean([np.mean([v for v, s in zip(scores, strata) if s == c]) for c in dict.fromkeys(strata)]))
        tr.log_metrics(rid, {"eval/accuracy/overall": acc, "train/reward_queries": 42.0 * step}, step)
    path = tmp_path / f"{method}{seed}" / OUTCOMES
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"strata": strata, "evals": {"0": {"accuracy/overall": base},
                                                             "5": {"accuracy/overall": final}}}))
    tr.log_artifact(rid, path, ARTIFACTS)
    tr.finish(rid)


def _lucky_real_worse(tmp_path):
    """The shapes store of the next two tests: three rows over 3 seeds and 24 eval samples in 6 categories."""
    strata = [c for c in "abcdef" for _ in range(4)]
    base = [1, 0, 0, 0] * 6
    lucky = list(base)
    lucky[1] = 1
    tr = tracking.Tracker()
    exp = tr.experiment("shapes")
    for seed in range(3):
        for method, final in (("lucky", lucky), ("real", [1, 1, 1, 0] * 6), ("worse", [0, 0, 0, 0] * 6)):
            _shapes_run(tr, exp, method, seed, base, final, strata, tmp_path)
    return tr, exp


def test_the_report_shows_the_paired_change_and_its_marks(tmp_path):
    """`rsmbench report`'s results table of the same store: the Δ base column and the marks the summary gives."""
    from rsmbench.analysis import report

    _lucky_real_worse(tmp_path)
    report.build(tmp_path / "rep", analyses=False)
    lines = [ln for ln in (tmp_path / "rep" / "results_shapes.md").read_text().splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r["configuration"]: r for r in
            (dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:])}
    assert re.fullmatch(r"-0\.25 \[-0\.[3-5]\d, -0\.[01]\d\]", rows["worse (original, flow)"]["Δ base"])
    assert rows["worse (original, flow)"]["marks"] == "< base" and "> base" in rows["real (original, flow)"]["marks"]
    assert "base" not in rows["lucky (original, flow)"]["marks"]


def test_the_summary_marks_above_base_by_the_paired_test(tmp_path):
    """Three shapes rows over 3 seeds: `lucky` gains the same single sample in every seed, so its seeds agree and the
    CI over seeds alone lies above the base (the old rule marked it); `real` gains most samples of every category;
    `worse` loses every pass. Only `real` is marked > base, `worse` < base, and the Δ base column shows the changes
    with their CIs."""
    tr, exp = _lucky_real_worse(tmp_path)
    rows = {r.method: r for r in summary.collect_rows(tr, exp)}
    metric = "eval/accuracy/overall"
    assert rows["lucky"].intervals[metric][1] > 0.25  # the seeds-only CI is above the base's 0.25
    summary.mark(list(rows.values()), metric, True, base=0.25)
    assert "> base" not in rows["lucky"].marks and "> base" in rows["real"].marks
    assert "base" not in rows["lucky"].marks and rows["worse"].marks == "< base"  # every category loses its one pass
    point, lo, _ = rows["lucky"].vs_base
    assert point == pytest.approx(0.25 / 6, abs=1e-12) and lo == 0.0
    assert rows["real"].vs_base[0] == pytest.approx(0.5, abs=1e-12)
    cells = {ln.split("|")[1].strip(): ln for ln in summary.table(list(rows.values()), ["accuracy"]).splitlines()}
    assert "Δ base" in cells["configuration"]
    assert re.search(r"\| \+0\.50 \[\+0\.[1-4]\d, \+0\.[6-8]\d\] \| best, > base \|$", cells["real (original, flow)"])


def test_rows_without_outcomes_keep_the_rule_on_the_ci_over_seeds(tmp_path):
    """A run that logged no eval_outcomes.json (every task but shapes) has no Δ base, and > base compares its CI
    over seeds with the base model's value, as before."""
    tr = tracking.Tracker()
    exp = tr.experiment("gmm")
    for seed in range(3):
        spec = {"task": "gmm", "method": "grpo", "formulation": "rsm", "process": "flow", "seed": seed,
                "train": {"lr": 1e-3}, "budget": {"reward_queries": 64, "mode": "matched"}, "hp": {}}
        rid = tr.create_run(exp, f"grpo-s{seed}", {"config_hash": runspec.config_hash(spec), "method": "grpo",
                                                   tracking.GROUP_TAG: tracking.config_group(spec),
                                                   "formulation": "rsm", "process": "flow", "seed": seed})
        tr.log_metrics(rid, {"eval/reward_mean": 3.0}, 0)
        tr.log_metrics(rid, {"eval/reward_mean": 4.0 + 0.1 * seed}, 5)
        tr.finish(rid)
    (row,) = summary.collect_rows(tr, exp)
    summary.mark([row], "eval/reward_mean", True, base=3.0)
    assert row.vs_base is None and row.outcomes == [None] * 3 and "> base" in row.marks
    assert "Δ base" not in summary.table([row], ["reward"])

"""Matched budgets: every run of a matched comparison spends its reward-query budget within 1 %, its last
iteration cut to fit; a budget some method cannot match is refused with one that works."""
import math

import pytest

from rsmbench.errors import UserError
from rsmbench.run import budget, tasks
from rsmbench.run.runspec import run_spec
from rsmbench.run.train import train_run
from tests.bench_helpers import tiny_overrides

# queries per sample on the gmm toy (flow, 10 steps): one per sample, DRaFT/AlignProp 2 (the final
# reward and its gradient), Branch-GRPO 4 leaves per root, RSM-ZO 10 and TempFlow-GRPO 14 branch leaves
# per root, VGG-Flow 11 (a reward gradient per trained row, plus the final reward)
MIX = ["grpo", "draft", "branch_grpo", "rsm_zo", "tempflow_grpo", "vgg_flow"]


def test_schedule_cuts_the_last_iteration_to_fit():
    s = budget.schedule(100, 3.0, 8, 10_000)  # 24 queries per iteration: 4 full ones (96) + 1 sample (3)
    assert s == {"queries_per_sample": 3.0, "samples_per_iteration": 8, "iterations": 5, "last_samples": 1,
                 "planned_queries": 99.0}
    assert budget.schedule(96, 3.0, 8, 10_000)["iterations"] == 4  # exact: no cut iteration
    assert budget.schedule(96, 3.0, 8, 2)["planned_queries"] == 48.0  # max_iterations wins


def test_smallest_matched_budget():
    costs = [1.0, 14.0]
    b = budget.smallest_matched_budget(costs, 100)
    assert all(abs(c * math.floor(b / c) - b) <= 0.01 * b for c in costs)
    assert not all(abs(c * math.floor((b - 1) / c) - (b - 1)) <= 0.01 * (b - 1) for c in costs)
    assert budget.smallest_matched_budget([1.0, 2.0], 100) == 100


def test_a_comparison_is_rematched_at_the_smallest_budget_all_spend():
    """claims' pruning rule: a pair that cannot both spend the task's budget within 1 % (aesthetic's
    unpruned VGG-Flow: 31 queries per sample against 210) runs at the smallest budget both do."""
    def planned(cost):
        return {"budget": {"mode": "matched", "reward_queries": 210,
                           "schedule": budget.schedule(210, cost, 8, 10_000)}}
    assert budget.comparison_budget([planned(1.0), planned(2.0)]) == 210
    b = budget.comparison_budget([planned(1.0), planned(31.0)])
    assert b == budget.smallest_matched_budget([1.0, 31.0], 210) > 210
    assert budget.within(31.0 * (b // 31), b) and not budget.within(31.0 * (210 // 31), 210)


def _specs(tmp_path, queries):
    wide = ["divergence.reward=[-1e9,1e9]", "divergence.kl=1e12"]  # random-init nets: far from sane
    cfg = tasks.load("gmm", tiny_overrides(tmp_path, batch=8) + [f"budget.reward_queries={queries}", *wide])
    return [run_spec(cfg, m, "original", "flow", 0) for m in MIX]


def test_every_planned_and_every_run_spends_within_one_percent(tmp_path):
    with pytest.raises(UserError, match=r"cannot be matched within 1 % by .*tempflow_grpo \(14 queries per sample\)"):
        budget.plan(_specs(tmp_path, 48))
    err = ""
    try:
        budget.plan(_specs(tmp_path, 48))
    except UserError as e:
        err = str(e)
    matched = int(err.rsplit("budget.reward_queries=", 1)[1].split()[0])
    plans = budget.plan(_specs(tmp_path, matched))
    costs = {p["method"]: p["budget"]["schedule"]["queries_per_sample"] for p in plans}
    assert costs == {"grpo": 1.0, "draft": 2.0, "branch_grpo": 4.0, "rsm_zo": 10.0, "tempflow_grpo": 14.0,
                     "vgg_flow": 11.0}
    for p in plans:
        assert abs(p["budget"]["schedule"]["planned_queries"] - matched) <= 0.01 * matched, p["method"]
    for p in plans:  # the runs spend what was planned
        if p["method"] in ("grpo", "tempflow_grpo", "vgg_flow"):
            res = train_run(p)
            assert res.counters.reward_queries == p["budget"]["schedule"]["planned_queries"], p["method"]
            assert res.iterations == p["budget"]["schedule"]["iterations"]

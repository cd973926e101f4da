"""The claims study: each verdict rule on synthetic per-seed values (a clear win is supported, a clear loss
contradicted, overlapping intervals inconclusive with the power they had), and `claims` on a tiny store
building the report and reusing every run on a second call."""
import math
import os
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rsmbench.analysis import claims
from rsmbench.analysis import verdicts as V
from rsmbench.errors import UserError
from tests.bench_helpers import tiny_overrides


def test_better_win_loss_and_overlap():
    win = V.better([5.0, 5.1, 5.2, 5.3], [1.0, 1.1, 1.2, 1.3], name_x="a", name_y="b")
    assert win.label == V.SUPPORTED and "P(a > b) = 1.00 [1.00, 1.00]" in win.why
    assert V.better([1.0, 1.1, 1.2, 1.3], [5.0, 5.1, 5.2, 5.3]).label == V.CONTRADICTED
    lower_is_better = V.better([1.0, 1.1, 1.2], [5.0, 5.1, 5.2], higher=False)
    assert lower_is_better.label == V.SUPPORTED
    tie = V.better([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    assert tie.label == V.INCONCLUSIVE and "contains ½" in tie.why
    assert "with 3 and 3 seeds the smallest difference of means detectable at 80% power and level 0.05 is" in tie.power
    assert V.better([1.0], [0.0]).label == V.INCONCLUSIVE  # one seed: no interval


def test_no_material_loss_margin():
    base = 0.0  # the unpruned configuration gains 10 over the base: the 10 % margin is 1
    assert V.no_material_loss([9.8, 9.9, 10.0, 10.1], [10.0, 10.0, 10.0, 10.0], base).label == V.SUPPORTED
    assert V.no_material_loss([7.0, 7.1, 7.2, 7.3], [10.0, 10.0, 10.0, 10.0], base).label == V.CONTRADICTED
    mixed = V.no_material_loss([7.0, 10.0, 9.0, 10.5], [10.0, 10.0, 10.0, 10.0], base)
    assert mixed.label == V.INCONCLUSIVE and "straddles the margin" in mixed.why and mixed.power
    # lower-is-better metric (a J-gap): the pruned form's larger gap is the loss
    assert V.no_material_loss([3.0, 3.1], [1.0, 1.0], base=5.0, higher=False).label == V.CONTRADICTED


def test_vanishes_all_pass_and_pattern():
    assert V.vanishes([1.0, 0.1, 0.0], [0.3, 0.03, 1e-14]).label == V.SUPPORTED
    assert V.vanishes([1.0, 0.1, 0.0], [0.3, 0.03, 0.01]).label == V.CONTRADICTED
    assert V.vanishes([1.0, 0.1, 0.0], [0.03, 0.3, 0.0]).label == V.CONTRADICTED  # grows as the scale shrinks
    assert V.all_pass({"a": True, "b": True}).label == V.SUPPORTED
    assert "b" in V.all_pass({"a": True, "b": False}).why
    p = V.pattern({"x": True, "y": False}, "follow it")
    assert p.label == V.CONTRADICTED and p.why.startswith("y do not")


def test_speedup_from_curves():
    base = [([0.0, 50.0, 100.0], [0.0, 0.5, 1.0])] * 2
    red = [([0.0, 50.0, 100.0], [0.0, 1.0, 1.0])] * 2  # reaches the baseline's final 1.0 at 50 queries
    assert claims.speedup(red, base, True)[0] == pytest.approx(2.0)
    never = [([0.0, 50.0, 100.0], [0.0, 0.2, 0.4])] * 2
    assert claims.speedup(never, base, True)[0] == 0.0
    # a baseline that ends below where both started: the redesign "reaches" it at 0 queries, which is no
    # speed-up at all (it was 0 before this fix, and counted as evidence against the claim)
    worse = [([0.0, 50.0, 100.0], [0.0, -0.5, -1.0])] * 2
    assert all(math.isnan(v) for v in claims.speedup(red, worse, True))


def _protocol(tmp_path, budget: int | None):
    proto = yaml.safe_load(claims.PROTOCOL.read_text())
    proto["only"] = ["3", "6"]
    proto["tasks"] = ["gmm"]
    proto["seeds"] = 2
    proto["pruning"]["methods"] = {"vgg_flow": proto["pruning"]["methods"]["vgg_flow"]}
    proto["redesigns"] = [r for r in proto["redesigns"] if r["baseline"] == "vgg_flow"]
    wide = ["divergence.reward=[-1e9,1e9]", "divergence.kl=1e12"]  # random-init nets: far from sane
    proto["overrides"] = tiny_overrides(tmp_path, iterations=4) + ["processes.flow.process.num_steps=4", *wide] \
        + ([f"budget.reward_queries={budget}"] if budget else [])
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(proto))
    return path


def _run(tmp_path):
    budget = None
    for _ in range(4):  # a tiny budget some method cannot match: take the one the planner names
        try:
            return claims.run_claims(task_list=["gmm"], workers=1, out=tmp_path / "out",
                                     proto_path=_protocol(tmp_path, budget), log=lambda *a: None)
        except UserError as e:
            budget = int(re.search(r"use budget.reward_queries=(\d+)", str(e)).group(1))
    raise AssertionError("no matchable budget")


def test_claims_on_a_tiny_store_builds_the_report_and_reuses_every_run(tmp_path):
    index = _run(tmp_path)
    text = index.read_text()
    assert "## 3. Pruning" in text and "## 6. The four redesigns" in text
    assert re.search(r"\| 3 \| .* \| (supported|contradicted|inconclusive) \|", text)
    assert "gmm, vgg_flow on flow" in text and "| first-order flow | gmm | rsm_fo | vgg_flow |" in text
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("gmm").experiment_id
    first = {r.info.run_id: r.info.end_time for r in c.search_runs([exp])}
    # pruned and unpruned VGG-Flow, RSM-FO: 3 configurations × 2 seeds; where the unpruned one cannot spend the
    # task's budget within 1 %, the pruning pair runs at the smallest budget both do, apart from claim 6's pruned runs
    rematched = "(the smallest budget both spend within 1 %" in text
    assert len(first) == (8 if rematched else 6)
    _run(tmp_path)
    assert {r.info.run_id: r.info.end_time for r in c.search_runs([exp])} == first  # every run reused
    assert (tmp_path / "out" / "claims.tex").read_text().count(r"\\") >= 3


def test_step_costs_measure_each_method_in_a_fresh_process():
    """Claim 7's memory: ru_maxrss is a lifetime peak, so each method's step is measured in its own process
    (two pids), and each reads its own growth from its own start (the second is not pinned at +0 MB by the
    first's peak)."""
    pairs = [{"method": "rsm_fo", "process": "flow"}, {"method": "draft", "process": "flow", "hp": {"k": 10}}]
    a, b = claims.step_costs("gmm", pairs)
    assert (a["method"], b["method"]) == ("rsm_fo", "draft")
    assert a["pid"] != b["pid"] and os.getpid() not in (a["pid"], b["pid"])
    assert a["seconds"] > 0 and b["seconds"] > 0 and a["samples"] == b["samples"] > 0

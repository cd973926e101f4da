"""Reports from a small synthetic MLflow store: every table and figure file, balanced LaTeX."""
import json
import re

import numpy as np

from rsmbench.analysis import report
from rsmbench.cli import main
from rsmbench.run import tracking


def _store(tmp_path):
    tr = tracking.Tracker()
    rng = np.random.default_rng(0)
    for task in ("gmm", "compressibility"):
        exp = tr.experiment(task)
        for method in ("reinforce_kl", "grpo"):
            for form in ("rsm", "original"):
                for seed in range(3):
                    rid = tr.create_run(exp, f"{method}-{form}-s{seed}", {
                        "method": method, "formulation": form, "process": "flow", "seed": seed, "task": task,
                        "method_family": "zeroth-order", "sweep": "toy", "sweep.estimator": method,
                        "sweep.temporal": "own" if seed % 2 else "uniform"})
                    gain = 1.0 if method == "grpo" else 0.5
                    for k, step in enumerate((0, 5, 10)):
                        m = {"eval/reward_mean": 1 + gain * k + 0.1 * rng.normal(), "eval/kl_ref": 0.1 * k * gain,
                             "eval/diversity": 2 - 0.2 * k, "eval/prior_frechet": 0.3 * k,
                             "train/nfe": 100.0 * step, "train/wall_time": 0.5 * step}
                        if step:
                            m["train/reward_queries"] = 64.0 * step
                        if task == "gmm":
                            m["eval/J_gap"] = 2.0 - gain * k
                        tr.log_metrics(rid, m, step)
                    tr.finish(rid)
    root = tracking.results_root()
    root.mkdir(parents=True, exist_ok=True)
    (root / "equiv.json").write_text(json.dumps([
        {"method": "grpo", "process": "flow", "max_rel_err": 3e-16,
         "offpolicy": [{"step": k, "max_rel_err": 10.0 ** (k - 16)} for k in range(6)]}]))


def _balanced(tex: str) -> bool:
    begins, ends = re.findall(r"\\begin\{(\w+)\}", tex), re.findall(r"\\end\{(\w+)\}", tex)
    stack = []
    for tok in re.findall(r"\\(begin|end)\{(\w+)\}", tex):
        if tok[0] == "begin":
            stack.append(tok[1])
        elif not stack or stack.pop() != tok[1]:
            return False
    return not stack and sorted(begins) == sorted(ends) and tex.count(r"\toprule") == 1


def test_report_writes_every_table_and_figure(tmp_path):
    _store(tmp_path)
    out = tmp_path / "rep"
    index = report.build(out, analyses=False)
    names = {p.name for p in out.iterdir()}
    for stem in ("table1", "results_gmm", "results_compressibility"):
        assert {f"{stem}.md", f"{stem}.tex"} <= names
        assert _balanced((out / f"{stem}.tex").read_text())
    for stem in ("efficiency", "pareto", "sweep_heatmap", "original_vs_rsm"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (out / f"{stem}.png").stat().st_size > 5000
    text = index.read_text()
    for f in names - {"index.md"}:
        assert f in text, f
    res = (out / "results_gmm.md").read_text()
    assert "**" in res and "grpo" in res and "(IQM" in res
    t1 = (out / "table1.md").read_text()
    assert "reinforce_kl" in t1 and "3e-16" in t1 and "not run" in t1


def test_queries_to_threshold_and_pareto_front_by_hand():
    pts = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 1.5], [0.05, 0.5]])
    f = report.pareto_front(pts, x_higher=False)  # low KL, high reward
    assert f.tolist() == [[0.05, 0.5], [0.1, 1.0], [0.2, 2.0]]
    f = report.pareto_front(pts, x_higher=True)
    assert f.tolist() == [[0.2, 2.0], [0.3, 1.5]]


def test_empty_store_or_unknown_task_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no MLflow store" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
    tracking.Tracker()  # an empty store
    assert main(["report", "--out", str(tmp_path / "r")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    _store(tmp_path)
    assert main(["report", "--task", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "tasks with runs: compressibility, gmm" in capsys.readouterr().err

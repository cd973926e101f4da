"""Reports from a small synthetic MLflow store: rows are configurations, diverged runs are diverged
everywhere, every table and figure is written, the LaTeX is ASCII and compiles (where pdflatex is)."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from rsmbench.analysis import figures, latex, report, stats, summary
from rsmbench.cli import main
from rsmbench.core import style
from rsmbench.core.method import load_all
from rsmbench.run import runspec, tracking


def _run(tr, exp, task, method, seed, *, form="rsm", proc="flow", lr=1e-3, gain=1.0, levels=None,
         diverged=None, rng=None, steps=(0, 5, 10), blowup=1.0):
    """One run as the bench logs it: tags (config_hash, config_group, ...), params (the flattened spec),
    eval metrics at the eval steps (the base model's values at 0), train/* from step 1 on."""
    spec = {"task": task, "method": method, "formulation": form, "process": proc, "seed": seed,
            "train": {"lr": lr}, "budget": {"reward_queries": 640, "mode": "matched"},
            "hp": dict(levels or {})}
    tags = {"config_hash": runspec.config_hash(spec), tracking.GROUP_TAG: tracking.config_group(spec),
            "method": method, "formulation": form, "process": proc, "seed": seed, "task": task,
            "method_family": "zeroth-order"}
    if levels:
        tags.update({"sweep": "toy", **{f"sweep.{k}": v for k, v in levels.items()}})
    rid = tr.create_run(exp, f"{method}-s{seed}", tags)
    tr.log_params(rid, tracking.flatten(spec))
    rng = rng or np.random.default_rng(seed)
    for k, step in enumerate(steps):
        if diverged is not None and step >= diverged:
            break
        r = 3.0 + gain * 0.3 * k * blowup ** k + 0.02 * rng.normal() if step else 3.0
        m = {"iteration": step, "eval/reward_mean": r, "eval/kl_ref": 0.1 * k * gain, "eval/diversity": 2 - 0.2 * k,
             "eval/prior_frechet": 0.3 * k}
        if task == "gmm":
            m.update({"eval/J": r - 0.1 * k * gain, "eval/J_gap": 1.0 - 0.3 * gain * k})
        if step:
            m.update({"train/reward_queries": 64.0 * step, "train/nfe": 1000.0 * step, "train/wall_time": 0.5 * step})
        tr.log_metrics(rid, m, step)
    if diverged is not None:
        tr.set_tags(rid, {"diverged": diverged, "error": "eval/reward_mean left the range"})
        tr.finish(rid, "FAILED")
    else:
        tr.finish(rid)
    return rid


def _store(with_equiv=True):
    tr = tracking.Tracker()
    rng = np.random.default_rng(0)
    for task in ("gmm", "compressibility"):
        exp = tr.experiment(task)
        for method, gain in (("reinforce_kl", 0.5), ("grpo", 1.0)):
            for form in ("rsm", "original"):
                for seed in range(3):
                    _run(tr, exp, task, method, seed, form=form, gain=gain, rng=rng,
                         levels={"estimator": method, "temporal": "own" if form == "rsm" else "uniform"})
    root = tracking.results_root()
    root.mkdir(parents=True, exist_ok=True)
    if with_equiv:
        (root / "equiv.json").write_text(json.dumps([
            {"method": "grpo", "process": "flow", "kind": "grad_at_behaviour", "dtype": "float64", "passed": True,
             "max_rel_err": 3e-16, "offpolicy": [{"step": k, "max_rel_err": 10.0 ** (k - 16)} for k in range(6)]},
            {"method": "dpok", "process": "diffusion", "kind": "approximate", "dtype": "float64", "passed": True,
             "max_rel_err": 0.31, "offpolicy": [{"step": k, "max_rel_err": 0.31} for k in range(6)]}]))
    return tr


def _diverged_store():
    """gmm: grpo (3 sane seeds, the best), reinforce_kl at two learning rates (3 seeds each), and
    alignprop whose seeds reach rewards 1000× larger before diverging at iteration 10."""
    tr = tracking.Tracker()
    exp = tr.experiment("gmm")
    for seed in range(3):
        _run(tr, exp, "gmm", "grpo", seed, gain=1.0)
        _run(tr, exp, "gmm", "reinforce_kl", seed, lr=3e-3, gain=0.5)
        _run(tr, exp, "gmm", "reinforce_kl", seed, lr=1e-2, gain=0.7)
        _run(tr, exp, "gmm", "alignprop", seed, gain=1.0, blowup=1000.0, diverged=10, steps=(0, 5, 10))
    return tr


def _table(path):
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_report_writes_every_table_and_figure(tmp_path):
    _store()
    out = tmp_path / "rep"
    index = report.build(out, analyses=False)
    names = {p.name for p in out.iterdir()}
    for stem in ("table1", "results_gmm", "results_compressibility"):
        assert {f"{stem}.md", f"{stem}.tex"} <= names
        tex = (out / f"{stem}.tex").read_text()
        assert tex.isascii() and tex.count(r"\toprule") == 1, stem
    for stem in ("efficiency", "pareto", "sweep_heatmap", "original_vs_rsm", "probability_of_improvement",
                 "performance_profile"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
        assert (out / f"{stem}.png").stat().st_size > 5000
    text = index.read_text()
    for f in names - {"index.md"}:
        assert f in text, f
    rows = _table(out / "results_gmm.md")
    assert len(rows) == 4  # 2 methods × 2 formulations (each its own configuration), 3 seeds each
    cell = re.compile(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]")
    assert all(r["seeds"] == "3" and cell.fullmatch(r["reward"].strip("*")) for r in rows)
    assert sum("**" in r["reward"] for r in rows) == 1 and "best" in {r["marks"].split(",")[0] for r in rows}
    t1 = (out / "table1.md").read_text()
    assert "grpo" in t1 and "flow: pass 3.0e-16" in t1 and "approx. gap 0.31" in t1 and "not checked" in t1
    assert "`pass x`" in text


def test_table1_without_equiv_says_how_to_produce_it(tmp_path):
    df, note = report.table1(tmp_path / "equiv.json")
    col = "equivalence (latest `make equiv`)"
    assert set(df[col]) == {report.EQUIV_HINT} and "make equiv" in note and "absent" in note


def test_two_learning_rates_are_two_rows_and_a_diverged_run_is_diverged_everywhere(tmp_path):
    _diverged_store()
    out = tmp_path / "rep"
    index = report.build(out, analyses=False)
    rows = {r["configuration"]: r for r in _table(out / "results_gmm.md")}
    lr_rows = [n for n in rows if n.startswith("reinforce_kl")]
    assert sorted(lr_rows) == ["reinforce_kl (rsm, flow) [train.lr=0.003]", "reinforce_kl (rsm, flow) [train.lr=0.01]"]
    assert all(rows[n]["seeds"] == "3" for n in lr_rows)  # two rows of 3 seeds, not one of 6
    div = rows["alignprop (rsm, flow)"]
    assert div["reward"] == "diverged at iteration 10, 10, 10 (3 of 3 seeds)"
    assert all(not v or v.startswith(("alignprop", "3", "– (640)", "diverged")) for v in div.values()), div
    md = (out / "results_gmm.md").read_text()
    assert "**diverged" not in md and "e+" not in md
    assert "**" in rows["grpo (rsm, flow)"]["reward"]  # bold: the best sane row
    # queries to threshold from the sane rows: grpo (best, gain 1) reaches halfway at its first eval
    assert rows["grpo (rsm, flow)"]["queries to threshold"].startswith("**320")
    # axis limits of the efficiency curves from the sane runs only (alignprop's last eval is ≈ 300)
    fig = figures.efficiency(_loaded(), tmp_path)
    assert len(fig.limits) == 6  # (reward, J) × (queries, NFE, wall-clock)
    for (xlim, ylim) in fig.limits.values():
        assert 3.3 < ylim[1] < 4  # the sane runs end ≤ 3.62; alignprop's last eval, ≈ 303, is not a limit
    assert "✕" in fig.caption
    text = index.read_text()
    assert "alignprop (rsm, flow) on gmm: diverged at iteration 10" in text  # pareto: left out, listed
    eff = [ln for ln in text.splitlines() if ln.startswith("Sample efficiency.")][0]
    assert "diverged" in eff


def _loaded():
    tasks_ = report.load(tracking.Tracker())
    report.load_histories(tracking.Tracker(), tasks_)
    return tasks_


def test_report_and_summary_give_identical_intervals(tmp_path):
    """The same runs through summary.collect_rows + summary.table (the bench's summary.md) and through
    the report: the same cells, and they are stats.interval's IQM [95 % CI] of the per-seed values."""
    tr = _diverged_store()
    out = tmp_path / "rep"
    report.build(out, analyses=False)
    rows = summary.collect_rows(tr, tr.experiment("gmm"))
    columns = ["reward", "KL", "J", "J-gap"]
    summ = {r["configuration"]: r for r in _table_text(summary.table(rows, columns))}
    rep = {r["configuration"]: r for r in _table(out / "results_gmm.md")}
    assert set(summ) == set(rep) and len(summ) == 4
    for name, s in summ.items():
        for c in columns:
            assert rep[name][c].strip("*") == s[c] or (s[c] == "" and rep[name][c] == ""), (name, c)
    r = [r for r in rows if r.name == "grpo (rsm, flow)"][0]
    point, lo, hi = stats.interval(r.values["eval/reward_mean"])
    assert rep["grpo (rsm, flow)"]["reward"].strip("*") == f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def _table_text(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_pareto_front_by_hand():
    pts = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 1.5], [0.05, 0.5]])
    f = figures.pareto_front(pts, x_higher=False)  # low KL, high reward
    assert f.tolist() == [[0.05, 0.5], [0.1, 1.0], [0.2, 2.0]]
    f = figures.pareto_front(pts, x_higher=True)
    assert f.tolist() == [[0.2, 2.0], [0.3, 1.5]]


def test_every_method_has_its_own_style_and_the_family_shows():
    reg = load_all()
    styles = {m: style.method_style(m) for m in reg}
    assert len({s.color for s in styles.values()}) == len(reg)
    assert len({(s.marker, s.filled) for s in styles.values()}) == len(reg)
    for m, s in styles.items():
        assert (s.ls, s.filled) == (("-", True) if reg[m].order == "zeroth" else ("--", False))
    assert style.row_style("grpo", 1, 2).marker == styles["grpo"].marker
    assert style.row_style("grpo", 1, 2).color != styles["grpo"].color


def test_latex_maps_unicode_to_ascii():
    assert latex.tex("Ψ̂") == r"$\hat{\Psi}$"
    assert latex.tex("s_θ†") == r"s\_$\theta \dagger$"
    assert latex.tex("σ²·x – 5 %") == r"$\sigma ^{2}\cdot$x -- 5 \%"
    t1, _ = report.table1(tracking.results_root() / "nope.json")
    assert latex.table(t1, "Table 1 — Ψ̂", "tab:t1").isascii()


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex is not installed (Debian: apt-get install texlive-latex-base "
                           "texlive-latex-recommended; .ci/run installs it when it can)")
def test_latex_tables_compile_with_pdflatex(tmp_path):
    _store()
    out = tmp_path / "rep"
    report.build(out, analyses=False)
    doc = out / "tables.tex"
    assert doc.read_text().isascii()
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=out,
                         capture_output=True, text=True, errors="replace", timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    assert (out / "tables.pdf").stat().st_size > 1000


def test_empty_store_or_unknown_task_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no MLflow store" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
    tracking.Tracker()  # an empty store
    assert main(["report", "--out", str(tmp_path / "r")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    _store()
    assert main(["report", "--task", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "tasks with runs: compressibility, gmm" in capsys.readouterr().err

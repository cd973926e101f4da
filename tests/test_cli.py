"""The command line: clear one-line errors with exit code 2, the equiv and list subcommands,
--version, ``python -m rsmbench``, and folders that do not depend on the working directory."""
import json
import os
import subprocess
import sys

import pytest

import rsmbench
from rsmbench.cli import main
from rsmbench.run import paths, tracking


@pytest.mark.parametrize("argv,needle", [
    (["nonsense"], "invalid choice"),
    ([], "missing subcommand"),
    (["equiv", "--dtype", "float16"], "invalid choice"),
    (["equiv", "--methods", "not_a_method"], "unknown method 'not_a_method'"),
    (["equiv", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_equiv_writes_json_and_passes(tmp_path, capsys):
    out = tmp_path / "equiv.json"
    assert main(["equiv", "--methods", "reinforce_kl", "--process", "flow", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert [r["method"] for r in recs] == ["reinforce_kl"] and recs[0]["passed"]
    assert {"method", "process", "kind", "dtype", "max_abs_err", "max_rel_err", "cosine", "passed",
            "offpolicy"} <= set(recs[0])
    assert "1 passed, 0 failed" in capsys.readouterr().out


# ---- list, --version, python -m rsmbench, and no dependence on the working directory ------------------
def test_list_each_kind(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert out.split("\n")[0].split() == ["method", "order", "processes", "equivalence", "kind", "presets"]
    ddpo = next(line.split() for line in out.splitlines() if line.startswith("ddpo "))
    assert ddpo == ["ddpo", "zeroth", "diffusion", "grad_at_behaviour", "2"]  # aesthetic, compressibility
    assert main(["list", "presets"]) == 0
    assert any(line.split()[:2] == ["ddpo", "ddpo_pytorch"] and "kvablack/ddpo-pytorch" in line
               for line in capsys.readouterr().out.splitlines())
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "2-D Gaussian mixture" in next(line for line in out.splitlines() if line.startswith("gmm "))
    assert "tiny, sd15, sd35" in next(line for line in out.splitlines() if line.startswith("aesthetic "))
    assert main(["list", "sweeps"]) == 0
    assert f"estimators    {paths.ROOT / 'tasks' / 'sweeps' / 'estimators.yaml'}" in capsys.readouterr().out
    assert main(["list"]) == 0  # all four
    out = capsys.readouterr().out
    assert all(h in out for h in ("task ", "method ", "preset ", "sweep "))
    assert main(["list", "rewards"]) == 2


def test_version_and_help_document_the_environment(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rsmbench {rsmbench.__version__} ({paths.ROOT})"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(v in out for v in ("RSMBENCH_RESULTS", "RSMBENCH_REPORTS", "RSMBENCH_TASKS", "MLFLOW_TRACKING_URI"))


def test_folders_resolve_against_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside the repository
    for var in ("RSMBENCH_RESULTS", "RSMBENCH_REPORTS", "RSMBENCH_TASKS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    assert paths.results_root() == paths.ROOT / "results" and paths.reports_root() == paths.ROOT / "reports"
    assert paths.sweeps_dir() == paths.ROOT / "tasks" / "sweeps"
    assert tracking.tracking_uri() == f"sqlite:///{paths.ROOT / 'results' / 'mlflow.db'}"
    assert main(["sweep", "nofile.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(paths.ROOT / "tasks" / "sweeps" / "estimators.yaml") in err, err
    assert main(["list", "tasks"]) == 0 and "gmm " in capsys.readouterr().out
    monkeypatch.setenv("RSMBENCH_RESULTS", "here")  # a relative value is relative to the working directory
    monkeypatch.setenv("RSMBENCH_REPORTS", str(tmp_path / "rep"))
    assert paths.results_root() == tmp_path / "here" and paths.reports_root() == tmp_path / "rep"
    assert list(tmp_path.iterdir()) == []  # nothing was written in the working directory


@pytest.mark.parametrize("module", ["rsmbench", "rsmbench.cli"])
def test_python_dash_m_gives_one_line_and_exit_2(module, tmp_path):
    """Run from outside the repository: the error raised in the subcommand is the one main catches."""
    env = dict(os.environ, PYTHONPATH=str(paths.ROOT))
    p = subprocess.run([sys.executable, "-m", module, "bench", "--task", "nope"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().startswith("unknown task 'nope'; choose from") and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stdout == ""


def test_every_option_has_help_with_its_default():
    """`--help` of every subcommand: each option says what it does; those with a default say it."""
    import argparse

    from rsmbench.cli import SUBCOMMANDS, _add_list_parser

    sub = argparse.ArgumentParser().add_subparsers()
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    _add_list_parser(sub)
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"rsmbench {name} {a.dest}: no help text"
            if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and not a.required:
                assert "default" in a.help, f"rsmbench {name} {a.option_strings[0]}: default {a.default!r} unsaid"


def test_a_shipped_sweep_runs_by_name(capsys):
    assert main(["sweep", "estimators", "--dry-run"]) == 0
    assert "runs to do" in capsys.readouterr().out


def test_equiv_shows_progress_on_stderr(capsys):
    assert main(["equiv", "--methods", "reinforce_kl", "--process", "flow"]) == 0
    out, err = capsys.readouterr()
    assert "equiv" in err and "reinforce_kl (flow)" in err and "1 passed" in out
    assert main(["equiv", "--methods", "reinforce_kl", "--process", "flow", "--no-progress"]) == 0
    assert "reinforce_kl (flow)" not in capsys.readouterr().err

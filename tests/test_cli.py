"""The command line: clear one-line errors with exit code 2, and the equiv subcommand."""
import json

import pytest

from rsmbench.cli import main


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

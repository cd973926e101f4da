"""The ``rsmbench`` command line. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


# ---- equiv -----------------------------------------------------------------------------------
def _add_equiv(sub):
    p = sub.add_parser("equiv", help="check that each method's two formulations give the same gradients")
    p.add_argument("--methods", type=_csv, default=None, help="comma-separated method ids (default: all)")
    p.add_argument("--process", choices=["diffusion", "flow", "all"], default="all")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--json", dest="json_path", default=None, help="write the records to this JSON file")
    p.add_argument("--preset", default=None, help="check each method at this published preset")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter override (YAML value), repeatable, e.g. --hp use_value_net=true")
    p.set_defaults(run=_run_equiv)


def _hp_overrides(items) -> dict:
    import yaml

    hp = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"rsmbench equiv: --hp expects KEY=VALUE, got {item!r}")
        try:
            hp[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"rsmbench equiv: --hp {key}: cannot parse value {value!r}") from None
    return hp


def _run_equiv(args) -> int:
    from rsmbench import equivalence

    procs = ("diffusion", "flow") if args.process == "all" else (args.process,)
    hp = _hp_overrides(args.hp)
    if args.preset:
        hp["preset"] = args.preset
    try:
        records = equivalence.run(args.methods, procs, args.dtype, hp=hp or None)
    except (KeyError, ValueError) as e:
        raise UsageError(str(e).strip("'\""))
    if not records:
        raise UsageError(f"no selected method applies to process {args.process!r}")
    print(equivalence.table(records))
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump([r.as_dict() for r in records], f, indent=1)
    failed = [r for r in records if r.kind in equivalence.EXACT and not r.passed]
    print(f"{len(records) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# Each entry adds one subparser; a module that owns a subcommand exposes `add_parser(sub)` and
# sets `run=` to a function(args) -> exit code, and is listed here.
def _add_pretrain(sub):
    from rsmbench import pretrain

    pretrain.add_parser(sub)


def _add_bench(sub):
    from rsmbench import bench

    bench.add_parser(sub)


def _add_sweep(sub):
    from rsmbench import sweep

    sweep.add_parser(sub)


def _add_report(sub):
    from rsmbench import report

    report.add_parser(sub)


SUBCOMMANDS = [_add_equiv, _add_pretrain, _add_bench, _add_sweep, _add_report]


def main(argv=None) -> int:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter (e.g. schema creation) on stderr
    parser = _Parser(prog="rsmbench", description="Reward Score Matching benchmark suite")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            raise UsageError("rsmbench: missing subcommand; choose one of "
                             + ", ".join(sorted(sub.choices)) + " (see 'rsmbench --help')")
        return args.run(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

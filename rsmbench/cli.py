"""The ``rsmbench`` command line (also ``python -m rsmbench``). Every user error
(``rsmbench.errors.UserError``) is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys

import rsmbench
from rsmbench.analysis import claims, report
from rsmbench.commands import bench, tune
from rsmbench.core import method as registry
from rsmbench.errors import UserError
from rsmbench.harness import equivalence
from rsmbench.run import paths, pretrain, sweep, tasks

LISTS = ("tasks", "methods", "presets", "sweeps")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage block
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


# ---- rsmbench list -----------------------------------------------------------------------------------
def _table(header: tuple, rows: list) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def _list_tasks() -> str:
    rows = []
    for name in tasks.available():
        try:
            title = tasks.load(name).get("title", "")
            profiles = ", ".join(["tiny", *tasks.full_scale_profiles(name)])
        except UserError as e:  # a broken task file is listed with its error, not fatal
            title, profiles = f"(cannot load: {e})", ""
        rows.append((name, profiles, title))
    return _table(("task", "profiles", "title"), rows) + f"\n({tasks.tasks_dir()})"


def _list_methods() -> str:
    reg = registry.load_all()
    rows = [(i, m.order, "/".join(m.processes), m.kind, len(m.presets)) for i, m in sorted(reg.items())]
    return _table(("method", "order", "processes", "equivalence kind", "presets"), rows)


def _list_presets() -> str:
    rows = [(i, name, preset.get("source", ""))
            for i, m in sorted(registry.load_all().items()) for name, preset in m.presets.items()]
    return _table(("method", "preset", "source"), rows)


def _list_sweeps() -> str:
    rows = [(p.stem, p) for p in sorted(paths.sweeps_dir().glob("*.yaml"))]
    return _table(("sweep", "file"), rows) if rows else f"no sweep files in {paths.sweeps_dir()}"


def _run_list(args) -> int:
    show = {"tasks": _list_tasks, "methods": _list_methods, "presets": _list_presets, "sweeps": _list_sweeps}
    print("\n\n".join(show[w]() for w in ([args.what] if args.what else LISTS)))
    return 0


def _add_list_parser(sub):
    p = sub.add_parser("list", help="the tasks, methods, presets or sweeps there are")
    p.add_argument("what", nargs="?", choices=LISTS, default=None,
                   help="tasks (name, profiles, title), methods (order, processes, equivalence kind), "
                        "presets (per method, with their source) or sweeps (name, file); default: all four")
    p.set_defaults(run=_run_list)


# Each module that owns a subcommand exposes ``add_parser(sub)``, which sets ``run=`` to a
# function(args) -> exit code; it is listed here.
SUBCOMMANDS = [equivalence, pretrain, bench, tune, sweep, report, claims]


def main(argv=None) -> int:
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter (e.g. schema creation) on stderr
    parser = _Parser(prog="rsmbench", description="Reward Score Matching benchmark suite",
                     epilog=paths.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rsmbench {rsmbench.__version__} ({paths.ROOT})")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    _add_list_parser(sub)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            raise UserError("rsmbench: missing subcommand; choose one of "
                            + ", ".join(sorted(sub.choices)) + " (see 'rsmbench --help')")
        return args.run(args)
    except UserError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

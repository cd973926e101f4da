"""The ``rsmbench`` command line. Every user error (``rsmbench.errors.UserError``) is one line on
stderr and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys

from rsmbench.analysis import report
from rsmbench.commands import bench, tune
from rsmbench.errors import UserError
from rsmbench.harness import equivalence
from rsmbench.run import pretrain, sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage block
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


# Each module that owns a subcommand exposes ``add_parser(sub)``, which sets ``run=`` to a
# function(args) -> exit code; it is listed here.
SUBCOMMANDS = [equivalence, pretrain, bench, tune, sweep, report]


def main(argv=None) -> int:
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter (e.g. schema creation) on stderr
    parser = _Parser(prog="rsmbench", description="Reward Score Matching benchmark suite")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
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

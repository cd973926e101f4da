"""Errors a user can cause and fix. Each is printed by ``rsmbench.cli.main`` as one line on
stderr, with exit code 2; nothing else in the package translates one error into another.

This module imports nothing from the package, so every layer can raise these."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a bad name, value, file or missing weights): one line on
    stderr, exit code 2."""

    exit_code = 2


class TaskError(UserError, ValueError):
    """A bad task name, profile, override or task file."""


class CheckpointError(UserError, RuntimeError):
    """A missing or corrupt base checkpoint (the message names ``rsmbench pretrain``)."""


class SweepError(UserError, ValueError):
    """A malformed sweep file."""


class ReportError(UserError, ValueError):
    """Nothing to report (an empty store, an unknown task or sweep)."""


class MissingWeights(UserError, RuntimeError):
    """A model or reward weight is not available locally (nothing is ever downloaded); the
    message names the fix."""

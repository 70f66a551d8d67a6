"""The base of every error a user can fix.

A `UserError` means the run cannot go on as asked, and its message says why and what to do (which file,
which field). `launch.py` catches this one class, prints the message as one line and exits with status 1;
anything else is a bug and keeps its traceback. Each part of the package has its own subclass, so that
callers can still catch the narrower kind (`ConfigError`, `StageError`, `DataNotFoundError`,
`BadImageError`, `PretrainedMismatchError`, `CheckpointError`, `NonFiniteLossError`).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input (config, files, checkpoints, data) that the user can fix; see the message."""


class StageError(UserError, ValueError):
    """A stage or command cannot start: the run it reads is missing or does not match, or its directory
    holds an incompatible run. The message says what to do."""

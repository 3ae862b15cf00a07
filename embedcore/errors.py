"""The user-error hierarchy: what the command lines report as one line and exit code 2.

An error caused by the user's input or environment (a config value, a data line, a model or
checkpoint path, an output that cannot be written) is raised as a `UserError` subclass at the
boundary where it is detected, with a message naming the dotted key, the file:line or the path.
`embedcore.cli.run_cli` prints it as `PROG: error: MESSAGE` and exits 2, without a traceback
(`--debug` or EMBEDCORE_DEBUG=1 shows it). Anything else is a bug and keeps its traceback: the
CLIs never catch Exception as a whole.

Each class also derives from the builtin that callers caught before it existed (ValueError,
FileNotFoundError, RuntimeError), so library users keep working.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "ModelError", "PathNotFound", "CheckpointError",
           "OutputError", "TrainingDiverged", "TrainingInterrupted"]


class UserError(Exception):
    """Caused by the user's input or environment; the message says what and where."""

    exit_code = 2
    # True where every rank reaches the same verdict (reduced over ranks): only rank 0 reports it.
    same_on_every_rank = False


class ConfigError(UserError, ValueError):
    """A bad configuration: the message names the key (dotted path) and what was expected."""


class DataError(UserError, ValueError):
    """Bad or missing data. The message names the file and the line (or JSON key).

    ``reason`` is a short machine-readable tag (``"malformed_json"``, ``"missing_query"``, ...):
    the key under which the example is counted when skipping is enabled.
    """

    def __init__(self, message: str, reason: str = "bad_data"):
        super().__init__(message)
        self.reason = reason


class ModelError(UserError, ValueError):
    """A model or tokenizer folder that cannot be used (unreadable config, weights refused by the
    safe loader, a model that needs remote code, an unsupported architecture)."""


class PathNotFound(UserError, FileNotFoundError):
    """A model, tokenizer, adapter or checkpoint path that does not exist (or is the wrong kind)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be found, is incomplete, or does not fit this run."""


class OutputError(UserError, RuntimeError):
    """An output (checkpoint folder, export, metrics or mining file) that cannot be written:
    permission denied, read-only file system, disk full."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss, gradient norm or weights blew up (non-finite, or past a divergence guard); the run
    stopped without saving the bad weights and LATEST still names the last good checkpoint."""

    same_on_every_rank = True


class TrainingInterrupted(UserError):
    """SIGINT / SIGTERM during training; the message says where the state was saved.
    exit_code is 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed by it. Not an
    error: the command line prints it without the "error:" label."""

    same_on_every_rank = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

"""The one user-error path of the three command lines (train.py, embedcore.mine, embedcore.evaluate).

`run_cli(prog, body, argv)` runs `body(argv)` and turns a `UserError` (embedcore.errors) into one
line on stderr, `PROG: error: MESSAGE`, and its exit code (2; 130/143 and no "error:" label for an
interrupt), with no traceback; a verdict every rank shares (divergence, interrupt) is printed by
rank 0 only. `--debug` anywhere on the command line (or EMBEDCORE_DEBUG=1) prints the traceback too.
An OSError that says the environment refused a write or a read (disk full, permission denied,
read-only file system, no such file) and names its path is reported the same way: those come from
the user's paths, not from a bug. Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

from embedcore.errors import TrainingInterrupted, UserError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "EMBEDCORE_DEBUG"
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                      errno.EISDIR, errno.ENOTDIR}


def environment_error_message(e: OSError) -> str | None:
    """One line for an OSError caused by the user's paths or disk, or None for anything else."""
    if e.errno not in ENVIRONMENT_ERRNOS or not e.filename:
        return None
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EISDIR: "is a directory, a file was expected",
            errno.ENOTDIR: "not a directory"}.get(e.errno, e.strerror)
    return f"{e.filename}: {what}"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


_current_prog: str | None = None  # the command line running now (set by run_cli)


def report_user_error(e: UserError) -> None:
    """Print `e` as the running command line's one line, once (rank 0 only for a verdict every
    rank shares). The trainer calls this itself for such a verdict before its ranks leave
    together: under torchrun a rank that exits first gets the others killed, perhaps before rank
    0 has said anything. Outside run_cli (a library caller) nothing is printed."""
    if _current_prog is None or getattr(e, "reported", False):
        return
    e.reported = True
    if not e.same_on_every_rank or os.environ.get("RANK", "0") == "0":
        label = "" if isinstance(e, TrainingInterrupted) else "error: "
        print(f"{_current_prog}: {label}{one_line(e)}", file=sys.stderr, flush=True)


def run_cli(prog: str, body: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    global _current_prog
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    _current_prog = prog
    try:
        return body(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        report_user_error(e)
        return e.exit_code
    except OSError as e:
        message = environment_error_message(e)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves and says where)
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        _current_prog = None

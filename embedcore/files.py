"""File reading and writing shared by the trainer and the CLIs, with errors that name the place.

Reading: `check_file` (exists, is a file), `read_text` (whole file, UTF-8), `iter_lines` (line
files: (line number, text), UTF-8 checked line by line so that an encoding error names the line
and the byte offset), `iter_records` / `read_jsonl` (JSON Lines: the non-blank lines, each with
the `path:line` its errors name), `parse_json_line`, `read_json`. Every problem is a DataError.
Writing: `write_json` and `replace_text` write a temporary file, fsync it and rename it over the
target, so a reader never sees half a file; a refused write (permission, read-only file system,
disk full) is an OutputError naming the path. `atomic_folder` (or `staging_folder` then
`publish_folder`, when several ranks fill the folder) does the same for a whole folder.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from embedcore.errors import DataError, OutputError


def check_file(path: str, what: str = "file") -> None:
    """DataError unless `path` is an existing regular file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: {what} not found", "file_not_found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a {what}", "unknown_format")


def _decode(raw: bytes, path: str, lineno: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte offset {offset + e.start} in the file: "
                        f"{raw[e.start:e.start + 4]!r})", "not_utf8") from None


def iter_lines(path: str, what: str = "file") -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 text file."""
    check_file(path, what)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, _decode(raw, path, lineno, offset)
            offset += len(raw)


def read_text(path: str, what: str = "file") -> str:
    """The whole UTF-8 file; an encoding error names its line and byte offset."""
    return "".join(line for _, line in iter_lines(path, what))


def iter_records(path: str, what: str = "file") -> Iterator[tuple[int, str, str]]:
    """(line number, "path:line", text) of every non-blank line of a UTF-8 line file (JSON Lines):
    "path:line" is the place every error about that line names. For a reader that parses each
    line itself (under its own skip-bad-examples rule); others use read_jsonl."""
    for lineno, line in iter_lines(path, what):
        if line.strip():
            yield lineno, f"{path}:{lineno}", line


def read_jsonl(path: str, what: str = "JSON Lines file", reason: str = "malformed_json") -> Iterator[tuple[str, Any]]:
    """("path:line", value) of every non-blank line of a JSON Lines file; a line that is not JSON
    is a DataError `path:line: malformed JSON line: ...` with `reason`."""
    for _, where, line in iter_records(path, what):
        yield where, parse_json_line(line, where, reason)


def parse_json_line(line: str, where: str, reason: str = "malformed_json"):
    """One JSON value from a line; DataError `where: malformed JSON ...` otherwise."""
    line = line.rstrip("\r\n")  # else an unfinished value is reported at column 1 of a next line
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON line: {e.msg} (column {e.pos + 1})", reason) from None


def read_json(path: str, what: str = "JSON file"):
    """A whole JSON document; errors name path:line."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})", "malformed_json") from None


def check_writable(path: str) -> None:
    """OutputError now, before any long work, if a file cannot be created at `path` later."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a directory, expected an output file path")
    probe = os.path.join(folder, f".embedcore_write_probe{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there: {e.strerror or e}") from e


def check_writable_folder(folder: str) -> None:
    """OutputError now if files cannot be created inside `folder` (created when missing)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{folder}: is a file, expected a folder")
    check_writable(os.path.join(folder, "probe"))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


def write_json(path: str, obj, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON (UTF-8) at `path`, atomically."""
    _write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=sort_keys))


def replace_text(path: str, text: str) -> None:
    """`text` at `path`, atomically (the LATEST pointer, small state files)."""
    _write_atomic(path, text)


def staging_folder(final: str, clear: bool = False) -> str:
    """The hidden sibling `.tmp_<name>` in which folder `final` is assembled, so that a crash
    mid-write never leaves a folder that looks complete. clear: remove what such a crash left
    there (one process only, when several ranks write into it)."""
    tmp = os.path.join(os.path.dirname(final), f".tmp_{os.path.basename(final)}")
    if clear and os.path.exists(tmp):
        shutil.rmtree(tmp)
    return tmp


def publish_folder(staging: str, final: str) -> str:
    """Rename the complete `staging` folder to `final`, replacing a stale `final`; returns final."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def atomic_folder(final: str, write: Callable[[str], object]) -> str:
    """Folder `final` written all at once: `write(tmp)` creates and fills a staging folder, which
    is then renamed to `final` (replacing an older one). Returns final."""
    tmp = staging_folder(final, clear=True)
    write(tmp)
    return publish_folder(tmp, final)

"""`python -m embedcore.info`: versions (installed next to the tested ones of the lock file), the
backends available and, for each missing one, why.

The lock file (requirements-lock.txt at the root of a checkout, written by `make lock`) holds the
exact versions the test suite passed with; `make` installs with it as pip constraints. A
difference is a warning, not an error: the pyproject ranges stay open for users.
"""
from __future__ import annotations

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, distributions, version

import torch

from embedcore.backends import backend_status
from embedcore.ops import contrastive, lora_linear, maxsim, pool_l2, prefix_contrastive

LOCK_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements-lock.txt")
# The public ops and their implementation tables (each op module's IMPLEMENTATIONS).
OPS = {"pool_l2": pool_l2.IMPLEMENTATIONS, "contrastive_loss": contrastive.IMPLEMENTATIONS,
       "maxsim_contrastive_loss": maxsim.IMPLEMENTATIONS, "lora_linear": lora_linear.IMPLEMENTATIONS,
       "matryoshka_contrastive_loss": prefix_contrastive.IMPLEMENTATIONS,
       "filtered_contrastive_loss": prefix_contrastive.IMPLEMENTATIONS}
# Shown on every report; the other locked packages appear only when they differ.
SHOWN = ("torch", "triton", "transformers", "kernels", "safetensors", "tokenizers", "huggingface-hub", "peft",
         "sentence-transformers", "numpy")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _base(v: str) -> str:
    """The version without its local label: torch's "2.13.0+cpu" is the locked "2.13.0"."""
    return v.split("+", 1)[0]


def read_lock(path: str = LOCK_FILE) -> dict[str, str] | None:
    """name -> version of the `name==version` lines, or None when there is no lock file."""
    if not os.path.isfile(path):
        return None
    locked = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, v = line.split("==", 1)
                locked[_canonical(name)] = v.strip()
    return locked


def installed_versions() -> dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def lock_mismatches(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name installed X, locked Y' (or 'not installed') for each locked package that differs."""
    out = []
    for name, want in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            out.append(f"{name} not installed, locked {want}")
        elif _base(have) != _base(want):
            out.append(f"{name} {have}, locked {want}")
    return out


def report(lock_path: str = LOCK_FILE) -> str:
    locked, installed = read_lock(lock_path), installed_versions()
    lines = [f"embedcore {_version()}", f"python {platform.python_version()} ({platform.machine()})",
             f"torch cuda available: {torch.cuda.is_available()}",
             f"versions (installed / locked in {os.path.basename(lock_path)}):" if locked is not None else
             f"versions (no lock file at {lock_path}: not a checkout)"]
    for name in SHOWN:
        have = installed.get(name, "not installed")
        want = (locked or {}).get(name, "-")
        mark = "" if locked is None or want == "-" or _base(have) == _base(want) else "   <-- differs"
        lines.append(f"  {name:22s} {have:16s} {want}{mark}")
    if locked is not None:
        mismatches = lock_mismatches(locked, installed)
        if mismatches:
            lines.append(f"WARNING: {len(mismatches)} installed version(s) differ from the tested lock "
                         f"(reinstall with `make install`, or `make lock` to adopt and test new ones): "
                         + "; ".join(mismatches))
    lines.append("backends:")
    for name, (ok, why) in backend_status().items():
        lines.append(f"  {name:7s} {'available' if ok else 'missing: ' + why}")
    lines.append("ops (backends that can run here; torch always):")
    for op, table in OPS.items():
        lines.append(f"  {op:28s} {', '.join(['torch'] + table.fast_backends())}")
    return "\n".join(lines)


def _version() -> str:
    try:
        return version("embedcore")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    print(report())

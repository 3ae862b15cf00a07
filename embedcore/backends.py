"""Backend discovery and dispatch.

Every op exists as a `torch` reference, a `triton` GPU kernel and a `cpp` CPU kernel with one
contract. `resolve(name, *tensors)` picks the backend for one call:

- an explicit `backend=` argument wins, then the `EMBEDCORE_BACKEND` environment variable;
- otherwise the device decides: CUDA -> triton, CPU -> cpp, anything else -> torch, falling
  back to torch (with a one-time notice) when the preferred backend is missing;
- a backend asked for by name that cannot run on the given tensors is an error, never a
  silent switch.
"""
from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton", "cpp")
ENV_VAR = "EMBEDCORE_BACKEND"
log = logging.getLogger("embedcore")


@lru_cache(maxsize=None)
def _probe(name: str) -> tuple[bool, str]:
    """(available, reason-if-not) for one backend; probed once per process."""
    if name == "torch":
        return True, ""
    if name == "cpp":
        try:
            importlib.import_module("embedcore._C")
        except ImportError as e:  # not built, or built against another torch
            return False, f"C++ extension embedcore._C not importable ({e}); build it with `make build`"
        return True, ""
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return False, f"triton not installed ({e})"
        if triton_interpreted():
            return True, ""
        if not torch.cuda.is_available():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, for tests)"
        return True, ""
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every op accumulates in fp32 (fp64 for fp64 inputs), whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status() -> dict[str, tuple[bool, str]]:
    return {name: _probe(name) for name in BACKENDS}


def available_backends() -> list[str]:
    """Backends that can run in this process (whatever the device of the tensors)."""
    return [name for name in BACKENDS if _probe(name)[0]]


def launch_helpers(op: str, backend: str):
    """The module with `op`'s launch helpers for a fast backend: embedcore.ops._<op>_cpp (cpp)
    or embedcore.kernels.<op> (triton); both expose the same function names."""
    module = f"embedcore.ops._{op}_cpp" if backend == "cpp" else f"embedcore.kernels.{op}"
    return importlib.import_module(module)


def cpp_ops():
    """The compiled extension's ops (`torch.ops.embedcore`), after making sure it is loaded."""
    ok, why = _probe("cpp")
    if not ok:
        raise RuntimeError(why)
    return torch.ops.embedcore


def _can_run(name: str, device: torch.device) -> tuple[bool, str]:
    ok, why = _probe(name)
    if not ok:
        return False, why
    if name == "cpp" and device.type != "cpu":
        return False, f"the cpp backend runs on CPU tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return False, f"the triton backend runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device.type} tensors"
    return True, ""


_noticed: set[str] = set()


def resolve(backend: str | None, *tensors: torch.Tensor | None) -> str:
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    explicit = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        if explicit not in BACKENDS:
            source = "backend=" if backend is not None else f"${ENV_VAR}="
            raise ValueError(f"unknown backend {source}{explicit!r}; expected one of {BACKENDS}")
        ok, why = _can_run(explicit, device)
        if not ok:
            raise RuntimeError(f"backend {explicit!r} was asked for but cannot run here: {why}")
        return explicit
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type, "torch")
    ok, why = _can_run(preferred, device)
    if ok:
        return preferred
    notice_fallback(preferred, why)
    return "torch"


def notice_fallback(name: str, why: str) -> None:
    """Say once per process that `name` is missing and the torch reference runs instead."""
    if name not in _noticed:
        _noticed.add(name)
        log.warning("embedcore: %s backend unavailable (%s); using the torch reference", name, why)

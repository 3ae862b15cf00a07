"""Backend discovery and dispatch.

Every op exists as a `torch` reference, a `triton` GPU kernel and a `cpp` CPU kernel with one
contract. `resolve(name, *tensors)` picks the backend for one call:

- an explicit `backend=` argument wins, then the `EMBEDCORE_BACKEND` environment variable;
- otherwise the device decides: CUDA -> triton, CPU -> cpp, anything else -> torch, falling
  back to torch (with a one-time notice) when the preferred backend is missing;
- a backend asked for by name that cannot run on the given tensors is an error, never a
  silent switch.

What runs once a backend is picked, each op declares itself: an `Implementations` table named
IMPLEMENTATIONS in its module under embedcore/ops/ (the launch modules of cpp and triton, and
the functions they share).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

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


def backend_status(*names: str) -> dict[str, tuple[bool, str]]:
    """name -> (available, reason-if-not) for the backends named (all three by default). Probing
    triton imports it: name only "cpp" where triton is not wanted yet."""
    return {name: _probe(name) for name in names or BACKENDS}


def available_backends() -> list[str]:
    """Backends that can run in this process (whatever the device of the tensors)."""
    return [name for name in BACKENDS if _probe(name)[0]]


@dataclass(frozen=True)
class Implementations:
    """The table each op declares beside its code: which module runs it on each fast backend.

    torch is always the op's `*_reference` function, called by the op itself and differentiated
    by plain autograd: it needs no launch module. cpp and triton name one launch module each,
    written out in full and imported on first use, so that `import embedcore` stays cheap and
    triton is imported only when a triton call is made. Both launch modules of an op expose the
    functions of `protocol` (forward and backward, plus the op's extras) with one signature, so
    the op's autograd.Function runs either without knowing which (tests/test_backends.py checks
    the signatures match).
    """

    op: str
    cpp: str
    triton: str
    protocol: tuple[str, ...] = ("forward", "backward")

    def launch(self, backend: str) -> ModuleType:
        """The launch module of a fast backend (a backend `resolve` returned)."""
        if backend not in ("cpp", "triton"):
            raise ValueError(f"{self.op}: {backend!r} has no launch module (torch runs the reference); "
                             f"expected 'cpp' or 'triton'")
        return importlib.import_module(self.cpp if backend == "cpp" else self.triton)

    def fast_backends(self) -> list[str]:
        """The fast backends that can run this op in this process: runtime present and launch
        module importable (importing the triton one imports triton)."""
        out = []
        for name in ("cpp", "triton"):
            if not _probe(name)[0]:
                continue
            try:
                self.launch(name)
            except ImportError:
                continue
            out.append(name)
        return out


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

"""The comparison rules of the op tests.

Ground truth is the torch reference in float64. A fast backend (cpp, triton) passes when its
error is at most 2x the error of the same reference run in the backend's dtype, plus a small
atol, for every output and every gradient (the flash-attention rule: `assert_close`).

The torch backend run in a test dtype IS that reference, so the 2x rule would compare it with
itself and could never fail. It is held instead to its own contract against float64 on the same
inputs (`assert_reference_precision`): computed in fp32 and rounded once to the output dtype, so
within one ulp of that dtype, plus the fp32 computation's own error (the rtol / atol of fp32 that
the other fixed-tolerance tests use). A reference that accumulated in bf16 would fail it.
`assert_matches` picks the rule by backend. On failure the message says where the values differ most.
"""
from __future__ import annotations

import torch

from embedcore import backends

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}
# The torch backend against float64: one ulp of the output dtype (relative), fp32's own error.
REFERENCE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-10}
REFERENCE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def backends_to_test() -> list[str]:
    """All three; one that cannot run here fails its tests rather than being skipped, except
    triton where the package is absent (CUDA-less installs without the dev extra)."""
    names = ["torch", "cpp"]
    try:
        import triton  # noqa: F401
        names.append("triton")
    except ImportError:
        pass
    return names


def _where(diff: torch.Tensor) -> str:
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return f"at index {idx}"


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, atol: float | None = None):
    """got and ref_lowp: the backend's and the reference's result in the test dtype."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype} != {ref_lowp.dtype}"
    atol = ATOL[got.dtype] if atol is None else atol
    g = got.detach().double().cpu()
    r = ref64.detach().double().cpu()
    assert torch.isfinite(g).all(), f"{name}: non-finite values {_where((~torch.isfinite(g)).double())}"
    err = (g - r).abs()
    ref_err = (ref_lowp.detach().double().cpu() - r).abs().max().item() if r.numel() else 0.0
    bound = 2 * ref_err + atol
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= bound, (
        f"{name}: max error {worst:.3e} > bound {bound:.3e} (2 x reference error {ref_err:.3e} + atol {atol:.1e}) "
        f"{_where(err)}: got {g.flatten()[err.argmax()].item():.6g}, expected {r.flatten()[err.argmax()].item():.6g}"
    )


def assert_reference_precision(name: str, got: torch.Tensor, ref64: torch.Tensor):
    """got: the torch backend's result in the test dtype; ref64: float64 on the same inputs. Every
    element within REFERENCE_RTOL[dtype] of its own magnitude plus REFERENCE_ATOL[dtype]."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    g = got.detach().double().cpu()
    r = ref64.detach().double().cpu()
    assert torch.isfinite(g).all(), f"{name}: non-finite values {_where((~torch.isfinite(g)).double())}"
    err = (g - r).abs()
    excess = err - (REFERENCE_RTOL[got.dtype] * r.abs() + REFERENCE_ATOL[got.dtype])
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= 0, (
        f"{name}: the {got.dtype} reference is off float64 by more than rtol {REFERENCE_RTOL[got.dtype]:.1e} + "
        f"atol {REFERENCE_ATOL[got.dtype]:.1e} {_where(excess)}: got {g.flatten()[excess.argmax()].item():.6g}, "
        f"expected {r.flatten()[excess.argmax()].item():.6g}"
    )


def assert_matches(backend: str, name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor):
    """The rule for `backend` (see the module docstring); ref64 must see the same inputs as got."""
    if backend == "torch":  # got is ref_lowp itself
        assert_reference_precision(f"{backend} {name}", got, ref64)
    else:
        assert_close(f"{backend} {name}", got, ref64, ref_lowp)


def resolve_ok(backend: str) -> None:
    """Fail loudly (not skip) when a backend the suite expects cannot run."""
    ok, why = backends.backend_status()[backend]
    assert ok, f"backend {backend} unavailable: {why}"

"""lora_linear: every backend against the float64 reference, forward and backward (dx, dA, dB),
odd shapes, leading batch dims, with and without dropout, fp32 and bf16; the dropout mask is
regenerated here from its seed and checked exactly."""
import pytest
import torch

from embedcore.ops.dropout_hash import keep_mask
from embedcore.ops.lora_linear import lora_linear, lora_linear_reference
from tolerance import assert_close, assert_matches, backends_to_test, device_for, resolve_ok

# (leading dims, in, out, r)
SHAPES = [((7,), 33, 29, 5), ((2, 3, 5), 20, 47, 1), ((3,), 130, 9, 128)]
SCALING = 2.0


def _inputs(lead, in_f, out_f, r, dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    bb = torch.randn(out_f, r, generator=g, dtype=torch.float64) / r**0.5
    dy = torch.randn(*lead, out_f, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (x, w, b, a, bb, dy)]


def _run(fn, x, w, b, a, bb, dy, **kw):
    x = x.detach().clone().requires_grad_()
    a = a.detach().clone().requires_grad_()
    bb = bb.detach().clone().requires_grad_()
    y = fn(x, w, b, a, bb, SCALING, **kw)
    y.backward(dy)
    return y, x.grad, a.grad, bb.grad


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
def test_matches_float64_reference(backend, dtype, dropout_p, shape):
    resolve_ok(backend)
    device = device_for(backend)
    lead, in_f, out_f, r = shape
    ins = _inputs(lead, in_f, out_f, r, dtype, device, bias=(r != 1))
    ins64 = [None if t is None else t.double().cpu() for t in ins]
    kw = dict(dropout_p=dropout_p, seed=1234)
    got = _run(lambda *a, **k: lora_linear(*a, **k, backend=backend), *ins, **kw)
    ref64 = _run(lora_linear_reference, *ins64, **kw)
    ref_lowp = _run(lora_linear_reference, *[None if t is None else t.cpu() for t in ins], **kw)
    for name, g, r64, rlp in zip(("y", "dx", "dA", "dB"), got, ref64, ref_lowp):
        assert_matches(backend, name, g, r64, rlp)  # torch: got is ref_lowp, held to float64 instead


@pytest.mark.parametrize("backend", backends_to_test())
def test_dropout_mask_is_the_seeded_one(backend):
    """With W = 0, A = B = I, scaling 1: y = mask * x / (1 - p) exactly, so the mask is read back."""
    resolve_ok(backend)
    device = device_for(backend)
    p, m, n = 0.4, 37, 16
    x = torch.rand(m, n, device=device) + 0.5  # never zero, so y == 0 means dropped
    eye = torch.eye(n, device=device)
    y = lora_linear(x, torch.zeros(n, n, device=device), None, eye, eye, 1.0, dropout_p=p, seed=99, backend=backend)
    mask = keep_mask(99, p, m, n).to(device)
    assert torch.equal(y != 0, mask), f"{backend}: dropped elements differ from keep_mask(seed=99)"
    torch.testing.assert_close(y[mask], (x / (1 - p))[mask], rtol=1e-6, atol=0)
    assert 0.5 < mask.float().mean().item() < 0.7, "keep rate far from 1 - p"


def test_keep_mask_statistics_and_seeds():
    a, b = keep_mask(1, 0.25, 64, 256), keep_mask(2, 0.25, 64, 256)
    assert torch.equal(a, keep_mask(1, 0.25, 64, 256)), "same seed must give the same mask"
    assert abs(a.float().mean().item() - 0.75) < 0.01
    assert (a != b).float().mean().item() > 0.3, "different seeds must give different masks"
    # neighbouring elements are not correlated (no striping from the counter)
    af = a.flatten().float()
    corr = torch.corrcoef(torch.stack([af[:-1], af[1:]]))[0, 1].item()
    assert abs(corr) < 0.02


@pytest.mark.parametrize("backend", backends_to_test())
def test_seed_none_follows_torch_manual_seed(backend):
    resolve_ok(backend)
    device = device_for(backend)
    x, w, b, a, bb, _ = _inputs((9,), 17, 11, 3, torch.float32, device)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(lora_linear(x, w, b, a, bb, SCALING, dropout_p=0.5, backend=backend))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(6)
    assert not torch.equal(outs[0], lora_linear(x, w, b, a, bb, SCALING, dropout_p=0.5, backend=backend))


@pytest.mark.parametrize("backend", backends_to_test())
def test_frozen_input_skips_dx(backend):
    """x without grad (e.g. the output of frozen embeddings): dA and dB still exact."""
    resolve_ok(backend)
    device = device_for(backend)
    x, w, b, a, bb, dy = _inputs((5, 3), 19, 13, 4, torch.float32, device)
    a1, b1 = a.clone().requires_grad_(), bb.clone().requires_grad_()
    lora_linear(x, w, b, a1, b1, SCALING, backend=backend).backward(dy)
    x64, a64, b64 = x.double().cpu(), a.double().cpu().requires_grad_(), bb.double().cpu().requires_grad_()
    lora_linear_reference(x64, w.double().cpu(), b.double().cpu(), a64, b64, SCALING).backward(dy.double().cpu())
    torch.testing.assert_close(a1.grad.double().cpu(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b1.grad.double().cpu(), b64.grad, rtol=1e-5, atol=1e-5)


def test_cpp_fp64():
    ins = _inputs((4,), 9, 6, 2, torch.float64, "cpu")
    got = _run(lambda *a, **k: lora_linear(*a, **k, backend="cpp"), *ins, dropout_p=0.2, seed=3)
    ref = _run(lora_linear_reference, *ins, dropout_p=0.2, seed=3)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(4, 7)), "in=7"),
        (dict(a=torch.randn(3, 7)), "lora_a must be"),
        (dict(bb=torch.randn(5, 2)), "lora_b must be"),
        (dict(b=torch.randn(4)), "bias must be"),
        (dict(w=torch.randn(5, 8, dtype=torch.float64)), "dtype"),
        (dict(w=torch.randn(5, 8, requires_grad=True)), "frozen"),
        (dict(dropout_p=1.0), r"\[0, 1\)"),
        (dict(dropout_p=-0.1), r"\[0, 1\)"),
    ],
)
def test_bad_input_says_what_was_expected(change, message):
    args = dict(x=torch.randn(4, 8), w=torch.randn(5, 8), b=torch.randn(5), a=torch.randn(3, 8), bb=torch.randn(5, 3),
                dropout_p=0.0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        lora_linear(args["x"], args["w"], args["b"], args["a"], args["bb"], 1.0, dropout_p=args["dropout_p"], backend="torch")


@pytest.mark.parametrize("dtype, dropout_p", [(torch.float32, 0.2), (torch.bfloat16, 0.0)], ids=["fp32-dropout", "bf16"])
def test_cpp_multi_chunk_path(dtype, dropout_p):
    """bf16 and dropout run the cpp kernels in row chunks of ~2^20 elements: 2100 x 1024 spans
    three chunks, so chunk offsets (and the mask index inside each chunk) are exercised."""
    resolve_ok("cpp")
    ins = _inputs((3, 700), 1024, 1024, 3, dtype, "cpu")
    kw = dict(dropout_p=dropout_p, seed=77)
    got = _run(lambda *a, **k: lora_linear(*a, **k, backend="cpp"), *ins, **kw)
    ref64 = _run(lora_linear_reference, *[t.double() for t in ins], **kw)
    ref_lowp = _run(lora_linear_reference, *ins, **kw)
    for name, g, r64, rlp in zip(("y", "dx", "dA", "dB"), got, ref64, ref_lowp):
        assert_close(f"cpp/{name}", g, r64, rlp)

"""pool_l2: every backend against the float64 reference, forward and backward."""
import pytest
import torch

import embedcore
from embedcore.ops.pool_l2 import MODES, pool_l2_reference, pooling_weights
from tolerance import assert_close, assert_matches, assert_reference_precision, backends_to_test, device_for, resolve_ok

BACKENDS = backends_to_test()


def make_mask(B, S, padding, generator):
    """Random lengths (one row all padding, one full), padded on the given side."""
    lengths = torch.randint(1, S + 1, (B,), generator=generator)
    lengths[0] = 0
    lengths[-1] = S
    pos = torch.arange(S)[None, :]
    right = (pos < lengths[:, None]).long()
    left = (pos >= S - lengths[:, None]).long()
    if padding == "right":
        return right
    if padding == "left":
        return left
    pick_left = (torch.arange(B) % 2 == 1)[:, None]
    return torch.where(pick_left, left, right)


def run(backend, hidden, mask, mode, normalize, grad_out):
    h = hidden.detach().clone().requires_grad_(True)
    out = embedcore.pool_l2(h, mask, mode, normalize=normalize, backend=backend)
    (g,) = torch.autograd.grad(out, h, grad_out.to(out.dtype))
    return out, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", ["right", "left", "mixed"])
def test_matches_float64_reference(backend, dtype, mode, padding):
    resolve_ok(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(hash((mode, padding)) % 2**31)
    B, S, D = 5, 9, 33
    hidden = torch.randn(B, S, D, generator=gen).to(dev)
    mask = make_mask(B, S, padding, gen).to(dev)
    out_shape = (B, S, D) if mode == "colbert" else (B, D)
    grad_out = torch.randn(out_shape, generator=gen).to(dev)
    for normalize in (True, False):
        got, g = run(backend, hidden.to(dtype), mask, mode, normalize, grad_out)
        if backend == "torch":  # the reference itself: float64 on the same rounded inputs (tolerance.py)
            ref64, g64 = run("torch", hidden.to(dtype).double(), mask, mode, normalize, grad_out.to(dtype).double())
            assert_reference_precision(f"torch {mode} norm={normalize} out", got, ref64)
            assert_reference_precision(f"torch {mode} norm={normalize} grad", g, g64)
            continue
        ref64, g64 = run("torch", hidden.double(), mask, mode, normalize, grad_out.double())
        ref_lp, g_lp = run("torch", hidden.to(dtype), mask, mode, normalize, grad_out)
        assert_close(f"{backend} {mode} norm={normalize} out", got, ref64, ref_lp)
        assert_close(f"{backend} {mode} norm={normalize} grad", g, g64, g_lp)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(backend, mode):
    resolve_ok(backend)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = make_mask(3, 6, "mixed", gen)
    for normalize in (True, False):
        assert torch.autograd.gradcheck(lambda h: embedcore.pool_l2(h, mask, mode, normalize=normalize, backend=backend), (hidden,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_all_padding_row_gives_zeros_with_finite_grad(backend, mode):
    dev = device_for(backend)
    hidden = torch.randn(2, 4, 8, device=dev, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], device=dev)
    out = embedcore.pool_l2(hidden, mask, mode, backend=backend)
    out.sum().backward()
    assert torch.all(out[0] == 0)
    assert out[1].abs().sum() > 0
    assert torch.isfinite(hidden.grad).all()
    assert torch.all(hidden.grad[0] == 0)


def test_semantics_by_hand():
    """cls/last are the first/last real token whatever the padding side; weighted_avg weights 1..n."""
    h = torch.arange(4, dtype=torch.float64).repeat(2, 1)[..., None].expand(2, 4, 2).contiguous()  # token t -> [t, t]
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])  # left-padded, right-padded
    cls = pool_l2_reference(h, mask, "cls", normalize=False)
    last = pool_l2_reference(h, mask, "last", normalize=False)
    wavg = pool_l2_reference(h, mask, "weighted_avg", normalize=False)
    avg = pool_l2_reference(h, mask, "avg", normalize=False)
    assert cls[:, 0].tolist() == [1.0, 0.0]
    assert last[:, 0].tolist() == [3.0, 2.0]
    assert wavg[:, 0].tolist() == pytest.approx([(1 * 1 + 2 * 2 + 3 * 3) / 6, (0 * 1 + 1 * 2 + 2 * 3) / 6])
    assert avg[:, 0].tolist() == pytest.approx([2.0, 1.0])
    assert pooling_weights(mask, "weighted_avg").sum(1).tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_and_mask_dtypes(backend):
    dev = device_for(backend)
    hidden = torch.randn(3, 7, 33, device=dev)
    mask = make_mask(3, 7, "mixed", torch.Generator().manual_seed(3)).to(dev)
    # torch is held to float64 on the same (fp16-rounded) inputs; the others by the 2x rule, as ever.
    ref64 = pool_l2_reference((hidden.half() if backend == "torch" else hidden).double(), mask)
    ref16 = pool_l2_reference(hidden.half(), mask)
    for m in (mask.bool(), mask.int(), mask.to(torch.uint8)):
        got = embedcore.pool_l2(hidden.half(), m, backend=backend)
        assert_matches(backend, f"fp16 mask {m.dtype}", got, ref64, ref16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    base = torch.randn(7, 3, 10, device=dev)
    hidden = base.transpose(0, 1)[:, :, ::2]  # [3, 7, 5], strided in every dim
    mask = make_mask(3, 7, "mixed", torch.Generator().manual_seed(4)).t().contiguous().t().to(dev)
    got = embedcore.pool_l2(hidden, mask, "weighted_avg", backend=backend)
    ref = pool_l2_reference(hidden.double(), mask, "weighted_avg")
    assert_matches(backend, "non-contiguous", got, ref, pool_l2_reference(hidden, mask, "weighted_avg"))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 3), torch.ones(2, 3)), "hidden must be a \\[B, S, D\\]"),
        ((torch.randn(2, 3, 4), torch.ones(2, 3, 1)), "attention_mask must be a \\[B, S\\]"),
        ((torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.long)), "does not match"),
        ((torch.randn(2, 3, 4), torch.ones(2, 3)), "integer or bool"),
    ],
)
def test_bad_shapes_are_explained(args, message):
    with pytest.raises(ValueError, match=message):
        embedcore.pool_l2(*args)


def test_bad_mode_and_eps_are_explained():
    h, m = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown mode 'max'.*expected one of"):
        embedcore.pool_l2(h, m, "max")
    with pytest.raises(ValueError, match="eps must be > 0"):
        embedcore.pool_l2(h, m, eps=0.0)
    with pytest.raises(ValueError, match="unknown mode"):
        embedcore.Pooler("sum")


def test_pooler_module_matches_function():
    h, m = torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(embedcore.Pooler("last", backend="cpp")(h, m), embedcore.pool_l2(h, m, "last", backend="cpp"))

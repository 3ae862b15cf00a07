"""contrastive_loss: every backend against the float64 torch reference (loss, dq, dp, ranks),
odd shapes, id masking, explicit layouts, bf16 and fp32, and input checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_matches, backends_to_test, device_for, resolve_ok

from embedcore.nn.contrastive import ContrastiveLoss
from embedcore.ops.contrastive import contrastive_loss, contrastive_loss_reference

BACKENDS = backends_to_test()
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(B, P, D, seed=0, normalize=True):
    g = torch.Generator().manual_seed(seed)
    q, p = torch.randn(B, D, generator=g), torch.randn(P, D, generator=g)
    if normalize:
        q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    return q, p


def _run(backend, q, p, dtype, device, grad_scale=1.0, **kw):
    """Loss, ranks, dq, dp of one backend on q, p cast to dtype (inputs leaf tensors)."""
    qx = q.to(device=device, dtype=dtype).requires_grad_()
    px = p.to(device=device, dtype=dtype).requires_grad_()
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, ranks = contrastive_loss(qx, px, return_ranks=True, backend=backend, **kw)
    dq, dp = torch.autograd.grad(loss * grad_scale, (qx, px))
    return loss.detach(), ranks, dq, dp


def _check_backend(backend, dtype, q, p, grad_scale=1.0, **kw):
    resolve_ok(backend)
    device = device_for(backend)
    # The float64 ground truth sees the same (rounded) inputs as the backend under test.
    q_in, p_in = q.to(dtype), p.to(dtype)
    ref64 = _run("torch", q_in.double(), p_in.double(), torch.float64, "cpu", grad_scale, **kw)
    ref_lowp = _run("torch", q_in, p_in, dtype, "cpu", grad_scale, **kw)
    got = _run(backend, q_in, p_in, dtype, device, grad_scale, **kw)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0, f"loss must be a 0-dim fp32 tensor, got {got[0].dtype} {tuple(got[0].shape)}"
    # torch: got is ref_lowp, so it is held to float64 by a fixed bound instead (tolerance.py)
    assert_matches(backend, "loss", got[0], ref64[0], ref_lowp[0])
    assert_matches(backend, "dq", got[2], ref64[2], ref_lowp[2])
    assert_matches(backend, "dp", got[3], ref64[3], ref_lowp[3])
    assert got[1].dtype == torch.int64 and torch.equal(got[1].cpu(), ref64[1]), f"ranks {got[1].tolist()} != reference {ref64[1].tolist()}"
    return got


# (B, P, D, temperature): odd sizes, a single query, P = B (no hard negatives), D over one
# Triton D block (70 > 64), a sharp temperature.
SHAPES = [(7, 21, 33, 0.05), (1, 5, 16, 0.02), (9, 9, 24, 0.02), (5, 15, 70, 0.02), (16, 48, 32, 0.01)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-P{}-D{}-T{}".format(*s))
def test_default_layout_matches_float64_reference(backend, dtype, shape):
    B, P, D, t = shape
    q, p = _inputs(B, P, D, seed=B * 1000 + P)
    _check_backend(backend, dtype, q, p, temperature=t)


def _duplicate_layout():
    """B=5 queries with 3 passages each; passage 7 is an exact copy of query 0's positive (0)
    and passage 13 one of query 1's positive (3), flagged by equal ids."""
    q, p = _inputs(5, 15, 17, seed=7)
    p[::3] = F.normalize(q + 0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(8)), dim=-1)
    p[7] = p[0]  # positives near their queries, so that an unmasked copy would weigh (log 2)
    p[13] = p[3]
    ids = torch.arange(100, 115)
    ids[7], ids[13] = ids[0], ids[3]
    return q, p, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicates_are_masked_by_passage_id(backend, dtype):
    q, p, ids = _duplicate_layout()
    got = _check_backend(backend, dtype, q, p, temperature=0.02, passage_ids=ids)
    # Masking must matter here: unmasked, the copies tie with the positives and sit in the denominator.
    unmasked = contrastive_loss_reference(q.double(), p.double(), 0.02)
    masked = contrastive_loss_reference(q.double(), p.double(), 0.02, passage_ids=ids)
    assert unmasked.item() > masked.item() + 0.1, "the test data does not exercise masking"
    assert abs(got[0].item() - masked.item()) < abs(got[0].item() - unmasked.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_positive_index(backend, dtype):
    B, P = 6, 10
    q, p = _inputs(B, P, 19, seed=3)
    pos = torch.randperm(P, generator=torch.Generator().manual_seed(1))[:B]
    ids = torch.arange(P)
    ids[int(pos[0]) - 1 if int(pos[0]) > 0 else P - 1] = ids[int(pos[0])]  # one duplicate of a positive
    _check_backend(backend, dtype, q, p, temperature=0.03, positive_index=pos, passage_ids=ids)


@pytest.mark.parametrize("backend", ["cpp"])
def test_cpp_spans_several_tiles(backend):
    """B > 256 and P > 1024: the C++ tiles (256 x 1024) split both ways, with ragged edges."""
    q, p = _inputs(300, 1200, 8, seed=11)
    ids = torch.arange(1200)
    ids[1100] = ids[4]  # a duplicate of query 1's positive in another column tile
    _check_backend(backend, torch.float32, q, p, temperature=0.02, passage_ids=ids)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_upstream_gradient_is_applied(backend):
    q, p = _inputs(7, 14, 16, seed=5)
    _check_backend(backend, torch.float32, q, p, grad_scale=2.5, temperature=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "p"])
def test_only_one_input_requires_grad(backend, which):
    device = device_for(backend)
    q, p = (t.to(device) for t in _inputs(7, 14, 12, seed=9))
    ref_q, ref_p = q.double().requires_grad_(), p.double().requires_grad_()
    contrastive_loss_reference(ref_q, ref_p, 0.02).backward()
    qx, px = q.clone().requires_grad_(which == "q"), p.clone().requires_grad_(which == "p")
    contrastive_loss(qx, px, 0.02, backend=backend).backward()
    leaf, frozen, ref = (qx, px, ref_q) if which == "q" else (px, qx, ref_p)
    assert frozen.grad is None
    torch.testing.assert_close(leaf.grad.double().cpu(), ref.grad.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharp_temperature_stays_finite(backend):
    """T = 0.01 with normalised embeddings and a near-duplicate negative: logits up to 100."""
    device = device_for(backend)
    q, p = _inputs(4, 8, 32, seed=2)
    p[3] = F.normalize(q[0] + 1e-3, dim=-1)  # a negative almost equal to the query
    qx, px = q.to(device).requires_grad_(), p.to(device).requires_grad_()
    loss, ranks = contrastive_loss(qx, px, 0.01, return_ranks=True, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10, f"loss {loss.item()} (the near-duplicate should dominate)"
    assert torch.isfinite(qx.grad).all() and torch.isfinite(px.grad).all()
    assert int(ranks[0]) > 1


def test_module_matches_function():
    q, p = _inputs(7, 21, 33, seed=4)
    module = ContrastiveLoss(temperature=0.05, backend="cpp")
    loss, ranks = module(q, p, return_ranks=True)
    ref, ref_ranks = contrastive_loss_reference(q.double(), p.double(), 0.05, return_ranks=True)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5) and torch.equal(ranks, ref_ranks)
    assert "temperature=0.05" in repr(module)
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0.0)


def test_no_grad_forward():
    q, p = _inputs(4, 8, 8)
    with torch.no_grad():
        loss = contrastive_loss(q.requires_grad_(), p, 0.02, backend="cpp")
    assert not loss.requires_grad and torch.isfinite(loss)


BAD_INPUTS = [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-0.5), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(p=torch.randn(10, 8)), "P must be a positive multiple of B"),
    (dict(p=torch.randn(12, 9)), "D must match"),
    (dict(positive_index=torch.tensor([0, 3, 6, 12])), "out of range for P=12"),
    (dict(positive_index=torch.tensor([0, -1, 6, 9])), "out of range for P=12"),
    (dict(positive_index=torch.tensor([0, 3, 6])), r"positive_index must be a \[B\] = \[4\] tensor"),
    (dict(positive_index=torch.tensor([0.0, 3.0, 6.0, 9.0])), "positive_index must be of an integer dtype"),
    (dict(passage_ids=torch.arange(11)), r"passage_ids must be a \[P\] = \[12\] tensor"),
    (dict(passage_ids=torch.arange(12).float()), "passage_ids must be of an integer dtype"),
    (dict(p=torch.randn(12, 8, dtype=torch.float64)), "q and p must share a dtype"),
    (dict(q=torch.randn(4)), r"q must be a \[B, D\] tensor"),
]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_says_what_was_expected(backend, bad, message):
    args = dict(q=torch.randn(4, 8), p=torch.randn(12, 8), temperature=0.02)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        contrastive_loss(backend=backend, **args)


def test_cpp_kernel_checks_positive_range_itself():
    """The C++ op validates on its own too (it is reachable as torch.ops.embedcore directly)."""
    from embedcore.backends import cpp_ops

    with pytest.raises(RuntimeError, match="out of range"):
        cpp_ops().contrastive_forward(torch.randn(2, 4), torch.randn(4, 4), torch.tensor([0, 4]), None, 50.0)


def _forbid_host_reads(monkeypatch):
    """Reading a tensor's value back on the host (int(), .item(), bool(), .tolist()) raises."""
    def read(*_a, **_k):
        raise AssertionError("a tensor value was read back on the host")

    for name in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read)


def test_positive_range_check_off_the_host_is_a_device_assert(monkeypatch):
    """Where host reads are not free (CUDA) the range check reads nothing back and asserts on the
    device; shown on CPU tensors with the device check mocked (torch._assert_async raises at once
    on CPU, so its condition and message are checked too)."""
    import embedcore.ops.contrastive as mod

    q, p = torch.randn(4, 8), torch.randn(12, 8)
    monkeypatch.setattr(mod, "_host_reads_are_free", lambda device: False)
    calls = []
    real_assert = torch._assert_async

    def recording_assert(cond, *msg):
        calls.append(cond)
        return real_assert(cond, *msg)

    monkeypatch.setattr(torch, "_assert_async", recording_assert)
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        mod._check(q, p, 0.02, torch.tensor([0, 3, 6, 11]), None)  # in range: no error, nothing read back
    assert len(calls) == 1 and calls[0].dtype == torch.bool and calls[0].shape == ()
    for bad in ([0, 3, 6, 12], [0, -1, 6, 9]):
        with pytest.raises(RuntimeError, match=r"positive_index out of range for P=12 passages"):
            mod._check(q, p, 0.02, torch.tensor(bad), None)
    # and on the host the check is the readable ValueError naming the value
    monkeypatch.setattr(mod, "_host_reads_are_free", lambda device: True)
    with pytest.raises(ValueError, match="positive_index holds 12, out of range for P=12"):
        mod._check(q, p, 0.02, torch.tensor([0, 3, 6, 12]), None)


def _cuda_explicit_layout(B=4, P=12, D=16):
    q, p = _inputs(B, P, D, seed=5)
    pos = torch.tensor([1, 4, 7, 10], device="cuda")
    return q.cuda().requires_grad_(), p.cuda().requires_grad_(), pos, torch.arange(P, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_input_checks_on_cuda_do_not_synchronise():
    """The checks of the multi-rank training step's call (explicit positive_index, passage ids)
    under CUDA's sync debug mode set to error: any host read raises."""
    import embedcore.ops.contrastive as mod

    q, p, pos, ids = _cuda_explicit_layout()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mod._check(q, p, 0.05, pos, ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()  # the device-side assert passed


@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in BACKENDS, reason="needs CUDA and triton")
def test_explicit_layout_on_cuda_does_not_synchronise():
    """The whole op as training runs it on CUDA (triton), forward and backward, without a host sync."""
    q, p, pos, ids = _cuda_explicit_layout()
    warm = contrastive_loss(q, p, 0.05, positive_index=pos, passage_ids=ids, backend="triton")
    torch.autograd.grad(warm, (q, p))  # compile the kernels outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = contrastive_loss(q, p, 0.05, positive_index=pos, passage_ids=ids, backend="triton")
        dq, dp = torch.autograd.grad(loss, (q, p))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = contrastive_loss_reference(q.detach().double(), p.detach().double(), 0.05, positive_index=pos, passage_ids=ids)
    assert torch.isfinite(dq).all() and torch.isfinite(dp).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)

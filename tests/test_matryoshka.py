"""matryoshka_contrastive_loss and filtered_contrastive_loss (the prefix_contrastive engine): every
backend against an independent float64 reference written here (a loop over prefixes and queries,
explicit per-prefix normalisation, not the op's own reference): loss, ranks, masked counts, dq, dp;
odd small shapes, unsorted dims, weights, fp32 / bf16 / fp64, id masking, explicit positives, the
false-negative filter off and on (relative margin, absolute delta, both; cases where it masks, asserted),
the negative-positive rule of the relative margin, K = 1 against contrastive_loss, and input checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_matches, backends_to_test, device_for, resolve_ok

from embedcore.ops.contrastive import contrastive_loss
from embedcore.ops.matryoshka import filtered_contrastive_loss, matryoshka_contrastive_loss

BACKENDS = backends_to_test()
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------ the independent reference
def loop_loss(q, p, temperature, dims, weights, pos, ids, margin, delta, normalize):
    """float64 q, p (leaves). Per prefix d and query i: raw scores c_ij of the prefix (cosines when
    normalize, x / max(|x|, 1e-12) written out), the filter threshold on c (the documented rule),
    the kept candidates, their logsumexp over c / T. Returns (loss, ranks [B, K], masked [B, K], gap):
    gap is the smallest distance of any score to its row's filter threshold (to keep test data away
    from ties the rounding could flip)."""
    B, P = q.shape[0], p.shape[0]
    K = len(dims)
    loss = q.sum() * 0 + p.sum() * 0
    ranks = torch.ones(B, K, dtype=torch.int64)
    masked = torch.zeros(B, K, dtype=torch.int64)
    gap = math.inf
    for k, (d, w) in enumerate(zip(dims, weights)):
        qd, pd = q[:, :d], p[:, :d]
        if normalize:
            qd = qd / torch.sqrt((qd * qd).sum(1, keepdim=True)).clamp_min(1e-12)
            pd = pd / torch.sqrt((pd * pd).sum(1, keepdim=True)).clamp_min(1e-12)
        for i in range(B):
            c = (pd * qd[i]).sum(1)  # [P]
            cv = c.detach().tolist()
            cp = cv[pos[i]]
            thr = math.inf
            if margin is not None:
                thr = min(thr, margin * cp)
            if delta is not None:
                thr = min(thr, cp - delta)
            kept = []
            for j in range(P):
                if j != pos[i] and ids is not None and ids[j] == ids[pos[i]]:
                    continue  # an id copy of the positive
                if j != pos[i] and math.isfinite(thr):
                    gap = min(gap, abs(cv[j] - thr))
                    if cv[j] > thr:
                        masked[i, k] += 1
                        continue
                kept.append(j)
                if j != pos[i] and cv[j] > cp:
                    ranks[i, k] += 1
            logits = c[kept] / temperature
            loss = loss + w * (torch.logsumexp(logits, 0) - c[pos[i]] / temperature) / B
    return loss, ranks, masked, gap


def _reference(q, p, op, temperature, dims=None, weights=None, positive_index=None, passage_ids=None, margin=None,
               delta=None, grad_scale=1.0):
    B, P, D = q.shape[0], p.shape[0], q.shape[1]
    pos = [b * (P // B) for b in range(B)] if positive_index is None else positive_index.tolist()
    ids = None if passage_ids is None else passage_ids.tolist()
    normalize = op is matryoshka_contrastive_loss
    dims = [D] if dims is None else list(dims)
    weights = [1.0] * len(dims) if weights is None else list(weights)
    qx, px = q.double().requires_grad_(), p.double().requires_grad_()
    loss, ranks, masked, gap = loop_loss(qx, px, temperature, dims, weights, pos, ids, margin, delta, normalize)
    dq, dp = torch.autograd.grad(loss * grad_scale, (qx, px))
    if not normalize:
        ranks, masked = ranks[:, 0], masked[:, 0]
    return loss.detach(), ranks, masked, dq, dp, gap


def _run(op, backend, q, p, dtype, device, grad_scale=1.0, **kw):
    qx = q.to(device=device, dtype=dtype).requires_grad_()
    px = p.to(device=device, dtype=dtype).requires_grad_()
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if op is matryoshka_contrastive_loss:
        loss, ranks, masked = op(qx, px, return_ranks=True, return_masked=True, backend=backend, **kw)
    else:
        loss, ranks, masked = op(qx, px, return_ranks=True, backend=backend, **kw)
    dq, dp = torch.autograd.grad(loss * grad_scale, (qx, px))
    return loss.detach(), ranks.cpu(), masked.cpu(), dq, dp


def _check(op, backend, dtype, q, p, grad_scale=1.0, min_gap=1e-4, **kw):
    """min_gap: how far every score must stay from its filter threshold in the float64 reference
    (both sides see the same rounded inputs and accumulate in fp32 or better, so ~1e-7 would do)."""
    resolve_ok(backend)
    q, p = q.to(dtype), p.to(dtype)  # the ground truth sees the same rounded inputs
    ref = _reference(q, p, op, grad_scale=grad_scale, **kw)
    assert ref[5] > min_gap, f"test data too close to a filter threshold (gap {ref[5]:.2e}): a rounding could flip it"
    ref_lowp = _run(op, "torch", q, p, dtype, "cpu", grad_scale, **kw)
    got = _run(op, backend, q, p, dtype, device_for(backend), grad_scale, **kw)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == want and got[0].dim() == 0, f"loss {got[0].dtype} {tuple(got[0].shape)}"
    assert got[3].dtype == dtype and got[4].dtype == dtype
    # torch: got is ref_lowp, so it is held to the float64 loop by a fixed bound instead (tolerance.py)
    assert_matches(backend, "loss", got[0], ref[0], ref_lowp[0])
    assert_matches(backend, "dq", got[3], ref[3], ref_lowp[3])
    assert_matches(backend, "dp", got[4], ref[4], ref_lowp[4])
    assert got[1].dtype == torch.int64 and torch.equal(got[1], ref[1]), f"ranks {got[1].tolist()} != {ref[1].tolist()}"
    assert got[2].dtype == torch.int64 and torch.equal(got[2], ref[2]), f"masked {got[2].tolist()} != {ref[2].tolist()}"
    return got, ref


# ------------------------------------------------------------------ inputs
def _inputs(B, P, D, seed=0, noise=0.6, scale=3.0):
    """Raw (unnormalised, varied norms) embeddings; passage i * n and its n - 1 hard negatives are
    noisy copies of query i, so positives and hard negatives score high and the filter has work."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g) * scale * torch.rand(B, 1, generator=g).add(0.5)
    p = torch.randn(P, D, generator=g) * scale
    if P % B == 0:
        n = P // B
        for i in range(B):
            for t in range(n):
                p[i * n + t] = q[i] + noise * (1 + t) * scale * torch.randn(D, generator=g)
    return q, p


def _ids_with_copies(P, copies):
    ids = torch.arange(100, 100 + P)
    for dst, src in copies:
        ids[dst] = ids[src]
    return ids


# (name, B, P, D, kwargs of matryoshka_contrastive_loss, whether the filter must mask something)
MATRYOSHKA_CASES = [
    ("plain", 3, 9, 13, dict(temperature=0.05, dims=[13, 8, 3]), False),
    ("weights-unsorted", 4, 8, 19, dict(temperature=0.03, dims=[4, 19, 11], weights=[0.25, 1.0, 2.0]), False),
    ("ids", 5, 10, 37, dict(temperature=0.05, dims=[37, 16, 5], passage_ids=_ids_with_copies(10, [(5, 0), (9, 2)])),
     False),
    ("positive-index", 4, 7, 17, dict(temperature=0.05, dims=[17, 6, 2],
                                      positive_index=torch.tensor([3, 0, 6, 1]),
                                      passage_ids=_ids_with_copies(7, [(2, 3)])), False),
    ("margin", 4, 12, 23, dict(temperature=0.05, dims=[23, 9, 2], margin=0.9), True),
    ("delta-ids", 5, 15, 17, dict(temperature=0.05, dims=[17, 6], delta=0.1,
                                  passage_ids=_ids_with_copies(15, [(4, 0), (14, 3)])), True),
    ("margin-and-delta", 3, 9, 29, dict(temperature=0.04, dims=[29, 12, 3], weights=[1.0, 0.5, 0.5], margin=0.95,
                                        delta=0.3), True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MATRYOSHKA_CASES, ids=[c[0] for c in MATRYOSHKA_CASES])
def test_matryoshka_matches_float64_loop(backend, dtype, case):
    name, B, P, D, kw, must_mask = case
    q, p = _inputs(B, P, D, seed=B * 100 + D)
    got, ref = _check(matryoshka_contrastive_loss, backend, dtype, q, p, **kw)
    K = len(kw["dims"])
    assert got[1].shape == (B, K) and got[2].shape == (B, K)
    if must_mask:
        assert int(ref[2].sum()) > 0, "the filter masks nothing on this data: the case would be vacuous"
    else:
        assert int(ref[2].sum()) == 0 and int(got[2].sum()) == 0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_matryoshka_upstream_gradient_and_float64(backend):
    q, p = _inputs(3, 6, 11, seed=4)
    _check(matryoshka_contrastive_loss, backend, torch.float32, q, p, grad_scale=2.5, temperature=0.05, dims=[11, 4],
           weights=[1.0, 3.0])
    _check(matryoshka_contrastive_loss, backend, torch.float64, q, p, temperature=0.05, dims=[5, 11], margin=0.9)


def test_cpp_spans_several_tiles():
    """B > 256 and P > 1024: the C++ tiles (256 x 1024) split both ways, with the filter and ids. Over
    a million scores some lie within 1e-5 of a threshold: the gap asked for is 1e-6 (seed chosen)."""
    q, p = _inputs(300, 1200, 9, seed=11, noise=0.3)
    ids = _ids_with_copies(1200, [(1100, 8)])
    got, ref = _check(matryoshka_contrastive_loss, "cpp", torch.float32, q, p, min_gap=1e-6, temperature=0.05,
                      dims=[9, 4, 2], margin=0.97, passage_ids=ids)
    assert int(ref[2].sum()) > 0


# (name, B, P, D, kwargs of filtered_contrastive_loss, whether the filter must mask something)
FILTER_CASES = [
    ("off", 4, 12, 15, dict(temperature=0.05), False),
    ("margin", 4, 12, 15, dict(temperature=0.05, margin=0.9), True),
    ("delta-positive-index", 5, 9, 21, dict(temperature=0.05, delta=0.1, positive_index=torch.tensor([0, 3, 8, 2, 6]),
                                             passage_ids=_ids_with_copies(9, [(1, 0)])), True),
    ("both-ids", 3, 9, 33, dict(temperature=0.03, margin=0.85, delta=0.15,
                                passage_ids=_ids_with_copies(9, [(4, 0)])), True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_filtered_matches_float64_loop(backend, dtype, case):
    name, B, P, D, kw, must_mask = case
    q, p = _inputs(B, P, D, seed=B * 10 + D, noise=0.4)
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)  # as contrastive_loss is used: scores are cosines
    got, ref = _check(filtered_contrastive_loss, backend, dtype, q, p, **kw)
    assert got[1].shape == (B,) and got[2].shape == (B,)
    assert (int(ref[2].sum()) > 0) == must_mask, f"masked {ref[2].tolist()}: the case does not test what it says"


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_on_unnormalised_scores_uses_the_raw_dot(backend):
    """The threshold applies to q.p before the temperature, also when q, p are not unit vectors
    (delta / T inside the engine): a data set where delta = 0.5 of the raw dot masks something."""
    q, p = _inputs(3, 9, 10, seed=3, noise=0.3, scale=0.5)
    got, ref = _check(filtered_contrastive_loss, backend, torch.float32, q, p, temperature=0.1, delta=0.5)
    assert int(ref[2].sum()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_margin_with_a_negative_positive_score(backend):
    """s_pos = -0.5 and margin 0.8: the threshold is 0.8 * -0.5 = -0.4, ABOVE the positive. A
    candidate at -0.45 (beats the positive, within the margin) is kept, one at -0.3 is masked, one at
    -0.6 is kept. With one query the masked passage gets exactly zero gradient (a mask, not a weight)."""
    def unit(c):  # a unit vector with cosine c against e0
        return torch.tensor([c, math.sqrt(1 - c * c), 0.0])

    q = torch.tensor([[1.0, 0.0, 0.0]])
    p = torch.stack([unit(-0.5), unit(-0.45), unit(-0.3), unit(-0.6)])
    got, ref = _check(filtered_contrastive_loss, backend, torch.float32, q, p, temperature=0.1, margin=0.8,
                      positive_index=torch.tensor([0]))
    assert got[2].tolist() == [1] and got[1].tolist() == [2]  # -0.3 masked; -0.45 kept and beats the positive
    assert torch.all(got[4].cpu()[2] == 0) and got[4].cpu()[1].abs().sum() > 0


# ------------------------------------------------------------------ agreement with contrastive_loss
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_full_prefix_equals_contrastive_loss_on_normalised_inputs(backend):
    device = device_for(backend)
    q, p = (t.to(device) for t in _inputs(5, 10, 27, seed=8))
    ids = _ids_with_copies(10, [(3, 2)]).to(device)
    qa, pa = q.clone().requires_grad_(), p.clone().requires_grad_()
    loss, ranks = matryoshka_contrastive_loss(qa, pa, 0.05, dims=[27], passage_ids=ids, return_ranks=True,
                                              backend=backend)
    qb, pb = q.clone().requires_grad_(), p.clone().requires_grad_()
    ref, ref_ranks = contrastive_loss(F.normalize(qb, dim=-1), F.normalize(pb, dim=-1), 0.05, passage_ids=ids,
                                      return_ranks=True, backend=backend)
    (loss + 0 * ranks.sum()).backward()
    ref.backward()
    assert ranks.shape == (5, 1) and torch.equal(ranks[:, 0], ref_ranks)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_off_is_contrastive_loss(backend):
    device = device_for(backend)
    q, p = (F.normalize(t, dim=-1).to(device) for t in _inputs(4, 8, 12, seed=2))
    loss, ranks, masked = filtered_contrastive_loss(q, p, 0.05, return_ranks=True, backend=backend)
    ref, ref_ranks = contrastive_loss(q, p, 0.05, return_ranks=True, backend=backend)
    assert torch.equal(loss, ref) and torch.equal(ranks, ref_ranks) and masked.tolist() == [0] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_scale_each_prefix(backend):
    """loss(dims, weights) = sum_k w_k loss([d_k]): the weighting and the per-prefix split."""
    device = device_for(backend)
    q, p = (t.to(device) for t in _inputs(3, 6, 14, seed=6))
    dims, weights = [14, 7, 3], [0.5, 2.0, 1.5]
    total = matryoshka_contrastive_loss(q, p, 0.05, dims=dims, weights=weights, backend=backend)
    parts = [matryoshka_contrastive_loss(q, p, 0.05, dims=[d], backend=backend) for d in dims]
    want = sum(w * x for w, x in zip(weights, parts))
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    assert abs(parts[0].item() - parts[2].item()) > 1e-3  # the prefixes really differ


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "p"])
def test_only_one_input_requires_grad(backend, which):
    device = device_for(backend)
    q, p = (t.to(device) for t in _inputs(3, 6, 10, seed=9))
    qx, px = q.clone().requires_grad_(which == "q"), p.clone().requires_grad_(which == "p")
    matryoshka_contrastive_loss(qx, px, 0.05, dims=[10, 4], margin=0.9, backend=backend).backward()
    ref = _reference(q, p, matryoshka_contrastive_loss, 0.05, dims=[10, 4], margin=0.9)
    leaf, frozen, want = (qx, px, ref[3]) if which == "q" else (px, qx, ref[4])
    assert frozen.grad is None
    torch.testing.assert_close(leaf.grad.double().cpu(), want, rtol=1e-4, atol=1e-5)


def test_default_dims():
    q, p = _inputs(2, 4, 600, seed=1)
    loss, ranks = matryoshka_contrastive_loss(q, p, 0.05, return_ranks=True, backend="cpp")
    want, want_ranks = matryoshka_contrastive_loss(q, p, 0.05, dims=[600, 512, 256, 128, 64], return_ranks=True,
                                                   backend="cpp")
    assert ranks.shape == (2, 5) and torch.equal(ranks, want_ranks) and torch.equal(loss, want)
    small = matryoshka_contrastive_loss(q[:, :40], p[:, :40], 0.05, return_ranks=True, backend="cpp")[1]
    assert small.shape == (2, 1)


def test_no_grad_and_return_arity():
    q, p = _inputs(2, 4, 8)
    with torch.no_grad():
        loss = matryoshka_contrastive_loss(q.requires_grad_(), p, 0.05, dims=[8, 3], backend="cpp")
    assert not loss.requires_grad and torch.isfinite(loss) and loss.dim() == 0
    out = matryoshka_contrastive_loss(q, p, 0.05, dims=[8, 3], return_masked=True, backend="cpp")
    assert len(out) == 2 and out[1].shape == (2, 2) and out[1].dtype == torch.int64
    assert len(filtered_contrastive_loss(q, p, 0.05, margin=0.9, backend="cpp")) == 2


# ------------------------------------------------------------------ input checks
BAD = [
    (dict(dims=[8, 8, 3]), "prefix lengths must be distinct"),
    (dict(dims=[8, 0]), r"every prefix length must be an integer in \[1, D=8\]"),
    (dict(dims=[9, 4]), r"every prefix length must be an integer in \[1, D=8\]"),
    (dict(dims=[8, 2.5]), r"every prefix length must be an integer"),
    (dict(dims=[]), "dims must be a non-empty list"),
    (dict(dims=8), "dims must be a non-empty list"),
    (dict(dims=[8, 4], weights=[1.0]), "one number per prefix length: 2 dims but 1 weights"),
    (dict(dims=[8, 4], weights=[1.0, -1.0]), "every weight must be a finite number >= 0"),
    (dict(dims=[8, 4], weights=[1.0, float("nan")]), "every weight must be a finite number >= 0"),
    (dict(margin=0.0), "margin must be a number > 0"),
    (dict(margin=-0.9), "margin must be a number > 0"),
    (dict(margin=float("nan")), "margin must be a finite Python number"),
    (dict(margin=torch.tensor(0.9)), "margin must be a finite Python number"),
    (dict(delta=-0.1), "delta must be a number >= 0"),
    (dict(delta=float("inf")), "delta must be a finite Python number"),
    (dict(temperature=0.0), "matryoshka_contrastive_loss: temperature must be a finite number > 0"),
    (dict(p=torch.randn(10, 8)), "matryoshka_contrastive_loss: .*P must be a positive multiple of B"),
    (dict(positive_index=torch.tensor([0, 3, 6, 12])), "out of range for P=12"),
]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_matryoshka_bad_input_says_what_was_expected(backend, bad, message):
    args = dict(q=torch.randn(4, 8), p=torch.randn(12, 8), temperature=0.02, dims=[8, 4])
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        matryoshka_contrastive_loss(backend=backend, **args)


@pytest.mark.parametrize("bad,message", [(dict(margin=0.0), "filtered_contrastive_loss: margin must be a number > 0"),
                                         (dict(delta=-1.0), "filtered_contrastive_loss: delta must be a number >= 0"),
                                         (dict(q=torch.randn(4)), r"filtered_contrastive_loss: q must be a \[B, D\]")])
def test_filtered_bad_input_says_what_was_expected(bad, message):
    args = dict(q=torch.randn(4, 8), p=torch.randn(12, 8), temperature=0.02)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        filtered_contrastive_loss(backend="cpp", **args)


def test_cpp_engine_checks_dims_itself():
    """The C++ op validates on its own (reachable as torch.ops.embedcore directly)."""
    from embedcore.backends import cpp_ops

    q, p = torch.randn(2, 4), torch.randn(4, 4)
    alpha, beta = torch.ones(2, 2), torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        cpp_ops().prefix_contrastive_forward(q, p, alpha, beta, torch.tensor([0, 2]), None, [4, 2], None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp_ops().prefix_contrastive_forward(q, p, alpha, beta, torch.tensor([0, 4]), None, [2, 4], None, None)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_engine_scale_gradients_through_autograd(backend):
    """The engine's generic entry (prefix_contrastive: alpha, beta as differentiable inputs, d alpha =
    sum_j dS s / alpha) with the prefix norms formed by torch autograd gives the gradients of the
    float64 loop too (the Matryoshka op itself applies that chain rule by hand, in fp32)."""
    from embedcore.ops.prefix_contrastive import prefix_contrastive

    device = device_for(backend)
    q, p = _inputs(4, 8, 15, seed=12)
    dims = [3, 9, 15]
    qx, px = q.to(device).requires_grad_(), p.to(device).requires_grad_()
    alpha = 1 / (0.05 * torch.stack([qx[:, :d].norm(dim=1) for d in dims], 1))
    beta = 1 / torch.stack([px[:, :d].norm(dim=1) for d in dims], 1)
    pos = torch.arange(4, device=device) * 2
    loss, ranks, masked = prefix_contrastive(qx, px, alpha, beta, dims, [1.0, 0.5, 2.0], pos, None, 0.9, None, backend)
    dq, dp = torch.autograd.grad(loss, (qx, px))
    ref = _reference(q, p, matryoshka_contrastive_loss, 0.05, dims=dims, weights=[1.0, 0.5, 2.0], margin=0.9)
    assert int(ref[2].sum()) > 0 and torch.equal(masked.cpu(), ref[2]) and torch.equal(ranks.cpu(), ref[1])
    torch.testing.assert_close(loss.double().cpu(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double().cpu(), ref[3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dp.double().cpu(), ref[4], rtol=1e-4, atol=1e-5)

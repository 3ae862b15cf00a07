"""maxsim_contrastive_loss and maxsim_scores: every backend against an independent float64
reference (a plain loop over query/passage pairs, written here, not the op's own reference):
loss, dq, dp, ranks; odd shapes, right and left padding, empty query rows, passages without
real tokens, ties in the max, explicit positives, id masking, bf16; and the input checks."""
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_matches, backends_to_test, device_for, resolve_ok

from embedcore.ops.maxsim import maxsim_contrastive_loss, maxsim_scores

BACKENDS = backends_to_test()
TEMPERATURE = 0.3


# ------------------------------------------------------------------ the independent reference
def loop_scores(q, qm, p, pm):
    """S[b, j] = sum over real query tokens of the max over real passage tokens, pair by pair.
    torch.max(dim) sends the gradient to the first maximum: the op's documented tie rule."""
    rows = []
    for b in range(q.shape[0]):
        row = []
        for j in range(p.shape[0]):
            qi, pt = q[b][qm[b] != 0], p[j][pm[j] != 0]
            if qi.shape[0] == 0 or pt.shape[0] == 0:
                row.append(q.sum() * 0 + p.sum() * 0)  # 0, still in the graph
            else:
                row.append((qi @ pt.T).max(dim=1).values.sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def loop_loss(q, qm, p, pm, temperature, pos, ids):
    B, P = q.shape[0], p.shape[0]
    s = loop_scores(q, qm, p, pm) / temperature
    losses, ranks = [], []
    for b in range(B):
        kept = [j for j in range(P) if j == pos[b] or ids is None or ids[j] != ids[pos[b]]]
        row = s[b, kept]
        losses.append(torch.logsumexp(row, 0) - s[b, pos[b]])
        ranks.append(1 + sum(int(s[b, j] > s[b, pos[b]]) for j in kept if j != pos[b]))
    return torch.stack(losses).mean(), torch.tensor(ranks)


# ------------------------------------------------------------------ inputs
def _tokens(N, L, D, lengths, left, g):
    tok = F.normalize(torch.randn(N, L, D, generator=g), dim=-1)
    mask = torch.zeros(N, L, dtype=torch.int64)
    for n, k in enumerate(lengths):
        if k:
            mask[n, L - k:] = 1 if left else 0
            mask[n, :k] = 0 if left else 1
    # padded positions hold garbage that must reach nothing
    return torch.where(mask[..., None] != 0, tok, torch.full_like(tok, 7.0)), mask


def _inputs(B=3, n=3, Lq=5, Lp=7, D=11, left=False, seed=0, empty=True):
    g = torch.Generator().manual_seed(seed)
    q_len = [int(x) for x in torch.randint(1, Lq + 1, (B,), generator=g)]
    p_len = [int(x) for x in torch.randint(1, Lp + 1, (B * n,), generator=g)]
    if empty:
        q_len[-1] = 0  # a query with no real token
        p_len[1] = 0   # a hard negative with no real token
    q, qm = _tokens(B, Lq, D, q_len, left, g)
    p, pm = _tokens(B * n, Lp, D, p_len, left, g)
    return q, qm, p, pm


def _run_op(backend, q, qm, p, pm, dtype, device, **kw):
    qx = q.to(device=device, dtype=dtype).requires_grad_()
    px = p.to(device=device, dtype=dtype).requires_grad_()
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, ranks = maxsim_contrastive_loss(qx, qm.to(device), px, pm.to(device), TEMPERATURE, return_ranks=True,
                                          backend=backend, **kw)
    dq, dp = torch.autograd.grad(loss, (qx, px))
    return loss.detach(), ranks.cpu(), dq, dp


def _run_loop(q, qm, p, pm, positive_index=None, passage_ids=None):
    B, P = q.shape[0], p.shape[0]
    pos = [b * (P // B) for b in range(B)] if positive_index is None else positive_index.tolist()
    ids = None if passage_ids is None else passage_ids.tolist()
    qx, px = q.double().requires_grad_(), p.double().requires_grad_()
    loss, ranks = loop_loss(qx, qm, px, pm, TEMPERATURE, pos, ids)
    dq, dp = torch.autograd.grad(loss, (qx, px))
    return loss.detach(), ranks, dq, dp


def _check(backend, dtype, q, qm, p, pm, **kw):
    resolve_ok(backend)
    q, p = q.to(dtype), p.to(dtype)  # ground truth and backend see the same rounded inputs
    ref64 = _run_loop(q, qm, p, pm, **kw)
    ref_lowp = _run_op("torch", q, qm, p, pm, dtype, "cpu", **kw)
    got = _run_op(backend, q, qm, p, pm, dtype, device_for(backend), **kw)
    want_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == want_loss_dtype and got[0].dim() == 0
    # torch: got is ref_lowp, so it is held to the float64 loop by a fixed bound instead (tolerance.py)
    assert_matches(backend, "loss", got[0], ref64[0].to(want_loss_dtype), ref_lowp[0])
    assert_matches(backend, "dq", got[2], ref64[2], ref_lowp[2])
    assert_matches(backend, "dp", got[3], ref64[3], ref_lowp[3])
    assert got[1].dtype == torch.int64 and torch.equal(got[1], ref64[1]), f"ranks {got[1].tolist()} != {ref64[1].tolist()}"
    return got


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_matches_the_float64_loop(backend, dtype, left):
    q, qm, p, pm = _inputs(left=left)
    got = _check(backend, dtype, q, qm, p, pm)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # padded positions and the token-less rows get exactly zero gradient
    assert (got[2].cpu()[qm == 0] == 0).all() and (got[3].cpu()[pm == 0] == 0).all()
    assert (got[2].cpu()[-1] == 0).all() and (got[3].cpu()[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_odd_shapes_cross_several_tiles(backend):
    q, qm, p, pm = _inputs(B=5, n=4, Lq=9, Lp=19, D=37, seed=3)
    _check(backend, torch.float32, q, qm, p, pm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs(backend):
    q, qm, p, pm = _inputs(seed=5)
    _check(backend, torch.float64, q, qm, p, pm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_send_the_gradient_to_the_first_maximal_token(backend):
    q, qm, p, pm = _inputs(B=2, n=2, Lq=3, Lp=4, D=5, seed=1, empty=False)
    pm[:] = 1
    p[:, 2] = p[:, 1]  # tokens 1 and 2 of every passage are equal: every max over them is a tie
    q[:, :, :] = p[0, 1]  # and every query token is that token, so the tie is the max for passage 0
    got = _check(backend, torch.float64, q, qm, p, pm)
    dp0 = got[3].cpu()[0]
    assert dp0[1].abs().sum() > 0 and (dp0[2] == 0).all(), "the tie's gradient must go to the first token only"


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_positives_and_id_masking(backend):
    q, qm, p, pm = _inputs(B=3, n=2, seed=7)
    positive_index = torch.tensor([4, 0, 3])
    passage_ids = torch.tensor([10, 11, 12, 10, 13, 10])  # passages 0, 3, 5 share an id
    got = _check(backend, torch.float32, q, qm, p, pm, positive_index=positive_index, passage_ids=passage_ids)
    plain = _run_op("torch", q, qm, p, pm, torch.float32, "cpu", positive_index=positive_index)
    assert not torch.allclose(got[0].cpu(), plain[0]), "id masking must change the loss here (the test would be vacuous)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_the_loop(backend):
    resolve_ok(backend)
    q, qm, p, pm = _inputs(B=4, n=3, Lq=6, Lp=9, D=13, seed=2, left=True)
    want = loop_scores(q.double(), qm, p.double(), pm)
    got = maxsim_scores(q.to(device_for(backend)), qm.to(device_for(backend)), p.to(device_for(backend)),
                        pm.to(device_for(backend)), backend=backend, passage_block=5)
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_real_token_makes_the_loss_nan_and_padding_never_counts(backend):
    resolve_ok(backend)
    q, qm, p, pm = _inputs(seed=4)
    dev = device_for(backend)
    args = lambda q_, p_: (q_.to(dev), qm.to(dev), p_.to(dev), pm.to(dev), TEMPERATURE)
    p_pad = p.clone()
    p_pad[pm == 0] = float("nan")  # garbage in padding reaches nothing
    clean = maxsim_contrastive_loss(*args(q, p), backend=backend)
    assert torch.isfinite(maxsim_contrastive_loss(*args(q, p_pad), backend=backend))
    torch.testing.assert_close(maxsim_contrastive_loss(*args(q, p_pad), backend=backend), clean)
    p_bad = p.clone()
    p_bad[pm != 0] = float("inf")
    assert torch.isnan(maxsim_contrastive_loss(*args(q, p_bad), backend=backend))


# ------------------------------------------------------------------ input checks
def _ok():
    return _inputs(B=2, n=2, Lq=3, Lp=4, D=5, empty=False)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q_tok": a["q_tok"][0]}, r"q_tok must be a \[B, Lq, D\] tensor"),
    (lambda a: {**a, "p_tok": a["p_tok"].double()}, "must share a dtype"),
    (lambda a: {**a, "p_tok": a["p_tok"][..., :4]}, "D must match"),
    (lambda a: {**a, "q_mask": a["q_mask"][:, :2]}, r"q_mask must be a \[B, Lq\]"),
    (lambda a: {**a, "q_tok": a["q_tok"][:, :0], "q_mask": a["q_mask"][:, :0]}, "Lq = 0"),
    (lambda a: {**a, "temperature": 0.0}, "temperature must be a finite number > 0"),
    (lambda a: {**a, "p_tok": a["p_tok"][:3], "p_mask": a["p_mask"][:3]}, "P must be a positive multiple of B"),
    (lambda a: {**a, "positive_index": torch.tensor([0, 4])}, "positive_index holds 4, out of range"),
    (lambda a: {**a, "positive_index": torch.tensor([0.0, 1.0])}, "positive_index must be of an integer dtype"),
    (lambda a: {**a, "passage_ids": torch.tensor([1, 2])}, r"passage_ids must be a \[P\]"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_clear_errors(backend, change, match):
    q, qm, p, pm = _ok()
    args = change(dict(q_tok=q, q_mask=qm, p_tok=p, p_mask=pm, temperature=TEMPERATURE))
    with pytest.raises(ValueError, match=match):
        maxsim_contrastive_loss(**args, backend=backend)

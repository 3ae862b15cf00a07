"""Matryoshka InfoNCE and the false-negative filter, on the prefix_contrastive engine.

matryoshka_contrastive_loss: InfoNCE summed with weights over K prefixes d_1, ..., d_K of the
embedding (sentence-transformers' MatryoshkaLoss around MultipleNegativesRankingLoss), each
prefix L2-normalised on its own:

    cos^k_ij = <q_i[:d_k], p_j[:d_k]> / (max(|q_i[:d_k]|, eps) max(|p_j[:d_k]|, eps))   (F.normalize)
    s^k_ij   = cos^k_ij / temperature
    loss     = sum_k w_k mean_i [ logsumexp_{j kept} s^k_ij - s^k_i,pos(i) ]

On the cpp and triton backends the K prefixes share one pass over the score tiles (the dot
products of every prefix come from the same loads; see embedcore/ops/prefix_contrastive.py). The
prefix norms are computed in torch (alpha = 1 / (T max(|q[:d]|, eps)), beta = 1 / max(|p[:d]|, eps),
[B, K] and [P, K]); the engine returns its gradients at fixed scales plus sum_j dS s and sum_i dS s,
and the chain rule through the norms (F.normalize's, the clamp included) is added in torch in the
accumulation dtype before one rounding to the input dtype (NormalizedPrefixContrastiveFunction).

filtered_contrastive_loss: contrastive_loss (embedcore/ops/contrastive.py, unchanged) with
positive-aware false-negative filtering (NV-Retriever's TopK-PercPos / TopK-MarginPos).

The false-negative filter (both ops). With c_ij the raw score of candidate j for query i BEFORE
the temperature (the prefix cosine for Matryoshka; the dot product q_i . p_j, i.e. the cosine for
L2-normalised inputs, for filtered_contrastive_loss) and c_pos its positive's:

    thr_i = min(margin * c_pos, c_pos - delta)        (each term only when given; no filter if neither)
    j is a likely false negative of i  <=>  j != pos(i), j not an id copy of pos(i), c_ij > thr_i

A likely false negative is left out of query i's denominator (like an id copy of the positive), is
not counted in the rank, and is counted in `masked` ([B] or [B, K] int64, per prefix for
Matryoshka), for logging. The decision is a mask: it is not differentiated. With both rules the
lower threshold wins (a candidate is masked when either rule masks it). Note for logging: ranks are
taken among the kept candidates, so whenever thr <= c_pos (margin <= 1 with c_pos >= 0, or any
delta) every candidate that beats the positive is masked and the rank is 1; log acc@1 / MRR from
an unfiltered pass if they should mean retrieval quality.

The sign rule of the relative margin: thr = margin * c_pos is applied as written, whatever the sign
of c_pos (NV-Retriever's formula). For c_pos > 0 and margin < 1 the threshold is below the
positive (candidates within the margin of the positive are masked); for c_pos < 0 it lies ABOVE the
positive, so only candidates that beat the positive by more than (1 - margin) |c_pos| are masked:
the filter becomes more lenient, never more aggressive, and at c_pos = 0 it masks exactly the
candidates that beat the positive. Use delta for a gap that does not depend on the sign.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from embedcore import backends
from embedcore.ops.contrastive import _check as _check_contrastive
from embedcore.ops.contrastive import contrastive_loss, default_positive_index, excluded_mask
from embedcore.ops.prefix_contrastive import (check_dims, check_filter, filter_threshold, normalized_prefix_contrastive,
                                              prefix_contrastive)

EPS = 1e-12  # F.normalize's default: a prefix norm is clamped at eps
DEFAULT_DIMS = (768, 512, 256, 128, 64)  # sentence-transformers' usual matryoshka_dims


def _check_common(where, q, p, temperature, positive_index, passage_ids):
    """contrastive_loss's checks, its messages naming `where`."""
    try:
        _check_contrastive(q, p, temperature, positive_index, passage_ids)
    except ValueError as e:
        raise ValueError(str(e).replace("contrastive_loss:", f"{where}:", 1)) from None


def _check_weights(weights, K: int, where: str) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * K
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if not hasattr(weights, "__len__") or isinstance(weights, (str, bytes)):
        raise ValueError(f"{where}: weights must be a list of {K} numbers (one per prefix length), got {weights!r}")
    if len(weights) != K:
        raise ValueError(f"{where}: weights must hold one number per prefix length: {K} dims but {len(weights)} "
                         f"weights ({list(weights)})")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: every weight must be a finite number >= 0, got {w!r} in {list(weights)}")
        out.append(float(w))
    return tuple(out)


def _layout(q, p, positive_index, passage_ids):
    B, P = q.shape[0], p.shape[0]
    pos = default_positive_index(B, P, q.device) if positive_index is None else positive_index.to(torch.int64)
    ids = None if passage_ids is None else passage_ids.to(torch.int64)
    return pos, ids


def _resolve_dims(dims, D: int, where: str) -> tuple[int, ...]:
    if dims is None:  # D itself and the usual smaller prefixes that fit
        return (D,) + tuple(d for d in DEFAULT_DIMS if d < D)
    return check_dims(dims, D, where)


# ------------------------------------------------------------------ torch references
def matryoshka_contrastive_loss_reference(q, p, temperature, dims, weights, positive_index=None, passage_ids=None,
                                          margin=None, delta=None):
    """The readable specification: per prefix, F.normalize and the whole [B, P] matrix in the
    accumulation dtype. dims / weights already checked. Returns (loss, ranks [B, K], masked [B, K])."""
    acc = backends.accumulation_dtype(q.dtype)
    B, P = q.shape[0], p.shape[0]
    pos, ids = _layout(q, p, positive_index, passage_ids)
    rows = torch.arange(B, device=q.device)
    excl = excluded_mask(pos, ids, P)
    loss = torch.zeros((), dtype=acc, device=q.device)
    ranks, masked = [], []
    # Cast once, then slice: the K prefixes' gradients then add up in the accumulation dtype and are
    # rounded to q's dtype once (sliced before the cast, each prefix's share was rounded to bf16 before
    # the sum, and shares that largely cancel lost their digits).
    qa, pa = q.to(acc), p.to(acc)
    for w, d in zip(weights, dims):
        cos = F.normalize(qa[:, :d], dim=-1, eps=EPS) @ F.normalize(pa[:, :d], dim=-1, eps=EPS).T
        fn = (cos.detach() > filter_threshold(cos.detach()[rows, pos], margin, delta)[:, None]) & ~excl
        fn[rows, pos] = False
        s = (cos / temperature).masked_fill(excl | fn, float("-inf"))
        s_pos = cos[rows, pos] / temperature
        loss = loss + w * (torch.logsumexp(s, dim=1) - s_pos).mean()
        ranks.append(1 + (s.detach() > s_pos.detach()[:, None]).sum(1))
        masked.append(fn.sum(1))
    return loss, torch.stack(ranks, 1), torch.stack(masked, 1)


def filtered_contrastive_loss_reference(q, p, temperature, margin=None, delta=None, positive_index=None,
                                        passage_ids=None):
    """The readable specification of filtered_contrastive_loss: (loss, ranks [B], masked [B])."""
    acc = backends.accumulation_dtype(q.dtype)
    B, P = q.shape[0], p.shape[0]
    pos, ids = _layout(q, p, positive_index, passage_ids)
    rows = torch.arange(B, device=q.device)
    excl = excluded_mask(pos, ids, P)
    c = q.to(acc) @ p.to(acc).T
    fn = (c.detach() > filter_threshold(c.detach()[rows, pos], margin, delta)[:, None]) & ~excl
    fn[rows, pos] = False
    s = (c / temperature).masked_fill(excl | fn, float("-inf"))
    s_pos = c[rows, pos] / temperature
    loss = (torch.logsumexp(s, dim=1) - s_pos).mean()
    ranks = 1 + (s.detach() > s_pos.detach()[:, None]).sum(1)
    return loss, ranks, fn.sum(1)


# ------------------------------------------------------------------ public ops
def matryoshka_contrastive_loss(q, p, temperature=0.02, dims=None, weights=None, positive_index=None,
                                passage_ids=None, margin=None, delta=None, return_ranks=False,
                                return_masked=False, backend=None):
    """Matryoshka InfoNCE: sum_k weights[k] * InfoNCE over the prefix q[:, :dims[k]], p[:, :dims[k]],
    each prefix L2-normalised on its own (F.normalize, eps 1e-12), scores = prefix cosine / temperature.

    q [B, D], p [P, D]: raw embeddings (not necessarily normalised), one floating dtype.
    dims: distinct prefix lengths in [1, D], in any order (e.g. [D, 512, 256, 128, 64]); None means D
    and those of 768, 512, 256, 128, 64 below D. weights: one finite number >= 0 per entry of dims
    (default all 1). positive_index, passage_ids: as contrastive_loss (default layout: query i's
    positive is passage i * (P // B); a passage with the id of query i's positive, other than it, is
    left out of query i's denominator). margin / delta: the false-negative filter on the prefix
    cosine (before the temperature), per prefix; see the module docstring (None: off).

    Returns the loss (0-dim, fp32; fp64 for fp64 inputs); with return_ranks and/or return_masked a
    tuple (loss, ranks, masked) holding those asked for, in that order: ranks [B, K] int64, column k
    the rank of query i's positive among its kept candidates under prefix dims[k] (1 = best, only
    strictly greater scores count); masked [B, K] int64 the number of candidates the filter left out
    (zeros when the filter is off). Columns follow the order of `dims` as given.
    """
    where = "matryoshka_contrastive_loss"
    _check_common(where, q, p, temperature, positive_index, passage_ids)
    dims = _resolve_dims(dims, q.shape[1], where)
    weights = _check_weights(weights, len(dims), where)
    check_filter(margin, delta, where)
    name = backends.resolve(backend, q, p)
    if name == "torch":
        loss, ranks, masked = matryoshka_contrastive_loss_reference(q, p, temperature, dims, weights, positive_index,
                                                                    passage_ids, margin, delta)
    else:
        # The engine wants increasing prefix lengths; its outputs are put back in the caller's order.
        order = sorted(range(len(dims)), key=lambda k: dims[k])
        sdims = tuple(dims[k] for k in order)
        pos, ids = _layout(q, p, positive_index, passage_ids)
        # The engine filters on its scores, cos / T: a relative margin is scale-free, an absolute
        # gap in cosine units is delta / T there.
        loss, ranks, masked = normalized_prefix_contrastive(
            q, p, temperature, sdims, tuple(weights[k] for k in order), pos, ids, margin,
            None if delta is None else delta / temperature, name, EPS)
        if order != sorted(order):
            inverse = torch.tensor(sorted(range(len(order)), key=lambda k: order[k]), device=ranks.device)
            ranks, masked = ranks.index_select(1, inverse), masked.index_select(1, inverse)
    extra = ((ranks,) if return_ranks else ()) + ((masked,) if return_masked else ())
    return (loss, *extra) if extra else loss


def filtered_contrastive_loss(q, p, temperature=0.02, margin=None, delta=None, positive_index=None,
                              passage_ids=None, return_ranks=False, backend=None):
    """contrastive_loss with positive-aware false-negative filtering.

    Same inputs and layout rules as contrastive_loss (q [B, D], p [P, D], usually L2-normalised).
    margin (> 0, e.g. 0.95) and / or delta (>= 0, e.g. 0.05) apply to the raw score q_i . p_j BEFORE
    the temperature (the cosine for normalised inputs, as NV-Retriever's TopK-PercPos): a candidate
    other than the positive and its id copies with q_i . p_j > min(margin * q_i . p_pos,
    q_i . p_pos - delta) is left out of query i's denominator and counted. A negative positive score
    under a relative margin: see the module docstring (the threshold margin * s_pos then lies above
    s_pos). Both None: exactly contrastive_loss, nothing masked.

    Returns (loss, masked) or, with return_ranks, (loss, ranks, masked): loss 0-dim fp32 (fp64 for
    fp64 inputs), ranks [B] int64 among the kept candidates, masked [B] int64 the number of
    candidates the filter left out for each query.
    """
    where = "filtered_contrastive_loss"
    _check_common(where, q, p, temperature, positive_index, passage_ids)
    check_filter(margin, delta, where)
    name = backends.resolve(backend, q, p)
    if name == "torch":
        loss, ranks, masked = filtered_contrastive_loss_reference(q, p, temperature, margin, delta, positive_index,
                                                                  passage_ids)
    elif margin is None and delta is None:
        loss, ranks = contrastive_loss(q, p, temperature, positive_index, passage_ids, return_ranks=True, backend=name)
        masked = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    else:
        # K = 1 over all of D with alpha = 1 / T, beta = 1: the engine's scores are (q . p) / T, so
        # the relative margin is unchanged and the absolute gap becomes delta / T.
        acc = backends.accumulation_dtype(q.dtype)
        B, P, D = q.shape[0], p.shape[0], q.shape[1]
        pos, ids = _layout(q, p, positive_index, passage_ids)
        alpha = torch.full((B, 1), 1.0 / temperature, dtype=acc, device=q.device)
        beta = torch.ones((P, 1), dtype=acc, device=q.device)
        loss, ranks, masked = prefix_contrastive(q, p, alpha, beta, (D,), (1.0,), pos, ids, margin,
                                                 None if delta is None else delta / temperature, name)
        ranks, masked = ranks[:, 0], masked[:, 0]
    return (loss, ranks, masked) if return_ranks else (loss, masked)

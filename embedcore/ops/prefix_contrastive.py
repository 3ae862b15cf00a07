"""prefix_contrastive: InfoNCE over K nested prefixes of the embedding in one pass over the tiles,
with id masking and false-negative filtering. The engine under Matryoshka training
and under the false-negative filter (`matryoshka_contrastive_loss`, `filtered_contrastive_loss`, both in
embedcore/ops/matryoshka.py); the plain `contrastive_loss` kernels are left as they are.

Inputs: q [B, D], p [P, D]; prefix lengths d_1 < ... < d_K <= D; per-row scales alpha [B, K] and
per-column scales beta [P, K] (accumulation dtype); weights w [K]; pos(i) the positive column of
query i; E(i) the columns whose passage id equals that of pos(i) (other than pos(i)). With

    s^k_ij = <q_i[:d_k], p_j[:d_k]> alpha_ik beta_jk

(Matryoshka: alpha_ik = 1 / (T |q_i[:d_k]|), beta_jk = 1 / |p_j[:d_k]|, so s^k is the prefix cosine
over T; the plain op's filter: K = 1, alpha = 1/T, beta = 1) and, when a filter is set,

    thr_ik = min(margin * s^k_i,pos(i),  s^k_i,pos(i) - delta)       (either term only if given)
    F_k(i) = { j != pos(i), j not in E(i) : s^k_ij > thr_ik }          (likely false negatives)

the op computes

    loss   = sum_k w_k mean_i [ lse_ik - s^k_i,pos(i) ],  lse_ik = logsumexp_{j not in E(i) u F_k(i)} s^k_ij
    rank_ik   = 1 + #{ kept j != pos(i) : s^k_ij > s^k_i,pos(i) }
    masked_ik = |F_k(i)|

Backward (g = d loss): dS^k_ij = g w_k / B (softmax^k_ij - [j == pos(i)]), 0 on left-out columns,

    dq_i[d] = sum_{k : d < d_k} sum_j dS^k_ij alpha_ik beta_jk p_j[d]     (dp likewise, transposed)
    d alpha_ik = sum_j dS^k_ij s^k_ij / alpha_ik,   d beta_jk = sum_i dS^k_ij s^k_ij / beta_jk

The kernels return the two sums of dS s; the division (and the chain rule into q and p through
the prefix norms, for Matryoshka) happens here, in torch. The filter's decisions are taken on the
scores themselves and are not differentiated (a mask, like the id mask). The forward keeps
lse and s_pos [B, K] (fp32) besides the inputs; the backward recomputes the score tiles.
"""
from __future__ import annotations

import math
import numbers

import torch

from embedcore import backends

# The C++ and Triton launch modules, one protocol: forward(q, p, alpha, beta, positive_index,
# passage_ids, dims, margin, delta) -> (lse, s_pos, ranks, masked), each [B, K]; backward(q, p, alpha,
# beta, positive_index, passage_ids, lse, s_pos, coef, dims, margin, delta, need_q, need_p,
# need_alpha, need_beta, acc_grads=False) -> (dq, dp, sum_j dS s [B, K], sum_i dS s [P, K]).
IMPLEMENTATIONS = backends.Implementations(
    op="prefix_contrastive", cpp="embedcore.ops._prefix_contrastive_cpp",
    triton="embedcore.kernels.prefix_contrastive")


def filter_threshold(s_pos: torch.Tensor, margin: float | None, delta: float | None) -> torch.Tensor:
    """thr = min(margin * s_pos, s_pos - delta) (each term only when given; +inf when neither)."""
    thr = torch.full_like(s_pos, float("inf"))
    if margin is not None:
        thr = torch.minimum(thr, margin * s_pos)
    if delta is not None:
        thr = torch.minimum(thr, s_pos - delta)
    return thr


def prefix_contrastive_reference(q, p, alpha, beta, dims, weights, positive_index, passage_ids=None,
                                 margin=None, delta=None):
    """The readable specification of the engine (the whole [B, P] matrix per prefix, in the
    accumulation dtype). Returns (loss, ranks [B, K], masked [B, K])."""
    from embedcore.ops.contrastive import excluded_mask

    acc = backends.accumulation_dtype(q.dtype)
    B, P = q.shape[0], p.shape[0]
    rows = torch.arange(B, device=q.device)
    pos = positive_index.to(torch.int64)
    excl = excluded_mask(pos, None if passage_ids is None else passage_ids.to(torch.int64), P)
    loss = torch.zeros((), dtype=acc, device=q.device)
    ranks, masked = [], []
    for k, d in enumerate(dims):
        s = (q[:, :d].to(acc) @ p[:, :d].to(acc).T) * alpha[:, k:k + 1].to(acc) * beta[:, k].to(acc)[None, :]
        s_pos = s[rows, pos]
        fn = (s > filter_threshold(s_pos, margin, delta)[:, None].detach()) & ~excl
        fn[rows, pos] = False
        s = s.masked_fill(excl | fn, float("-inf"))
        loss = loss + weights[k] * (torch.logsumexp(s, dim=1) - s_pos).mean()
        ranks.append(1 + (s.detach() > s_pos.detach()[:, None]).sum(1))
        masked.append(fn.sum(1))
    return loss, torch.stack(ranks, 1), torch.stack(masked, 1)


def check_dims(dims, D: int, where: str) -> tuple[int, ...]:
    """dims: a non-empty sequence of distinct integers in [1, D], in any order; returned as a tuple
    (the engine itself wants them increasing: callers sort and map their outputs back)."""
    if isinstance(dims, (int, torch.Tensor)) or not hasattr(dims, "__len__") or len(dims) == 0:
        raise ValueError(f"{where}: dims must be a non-empty list of prefix lengths, got {dims!r}")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 1 <= d <= D:
            raise ValueError(f"{where}: every prefix length must be an integer in [1, D={D}], got {d!r} in {list(dims)}")
        out.append(int(d))
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: prefix lengths must be distinct, got {list(dims)}")
    return tuple(out)


def check_filter(margin, delta, where: str) -> None:
    """margin: a finite number > 0 or None; delta: a finite number >= 0 or None."""
    for name, v in (("margin", margin), ("delta", delta)):
        if v is None:
            continue
        if isinstance(v, (torch.Tensor, bool)) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: {name} must be a finite Python number or None, got {v!r}")
    if margin is not None and not margin > 0:
        raise ValueError(f"{where}: margin must be a number > 0 (a fraction of the positive's score, "
                         f"e.g. 0.95), got {margin!r}")
    if delta is not None and delta < 0:
        raise ValueError(f"{where}: delta must be a number >= 0 (a gap below the positive's score, e.g. 0.05), "
                         f"got {delta!r}")


def _engine_forward(ctx, backend, q, p, alpha, beta, positive_index, passage_ids, dims, weights, margin, delta):
    """The forward both autograd Functions share: the engine's pass, the weighted loss, and the
    launch module and settings kept on ctx by name for backward. -> (loss, ranks, masked, lse, s_pos, w)."""
    ctx.launch = IMPLEMENTATIONS.launch(backend)
    ctx.dims, ctx.margin, ctx.delta = dims, margin, delta
    lse, s_pos, ranks, masked = ctx.launch.forward(q, p, alpha, beta, positive_index, passage_ids, dims, margin,
                                                   delta)
    w = torch.tensor(weights, dtype=lse.dtype).to(lse.device, non_blocking=True)
    loss = ((lse - s_pos).mean(0) * w).sum()
    ctx.mark_non_differentiable(ranks, masked)
    return loss, ranks, masked, lse, s_pos, w


class PrefixContrastiveFunction(torch.autograd.Function):
    """forward(q, p, alpha, beta, positive_index, passage_ids, dims, weights, margin, delta, backend)
    -> (loss, ranks [B, K], masked [B, K]); margin / delta in score units (None: off)."""

    @staticmethod
    def forward(ctx, q, p, alpha, beta, positive_index, passage_ids, dims, weights, margin, delta, backend):
        loss, ranks, masked, lse, s_pos, w = _engine_forward(ctx, backend, q, p, alpha, beta, positive_index,
                                                             passage_ids, dims, weights, margin, delta)
        ctx.save_for_backward(q, p, alpha, beta, positive_index, passage_ids, lse, s_pos, w)
        return loss, ranks, masked

    @staticmethod
    def backward(ctx, grad_loss, _grad_ranks, _grad_masked):
        q, p, alpha, beta, pos, ids, lse, s_pos, w = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        if not any(need):
            return (None,) * 11
        coef = (grad_loss.to(lse.dtype) / q.shape[0]) * w  # [K] on the device: no host sync
        dq, dp, row_sds, col_sds = ctx.launch.backward(q, p, alpha, beta, pos, ids, lse, s_pos, coef, ctx.dims,
                                                       ctx.margin, ctx.delta, *need)
        dalpha = row_sds / alpha if need[2] else None
        dbeta = col_sds / beta if need[3] else None
        return dq, dp, dalpha, dbeta, None, None, None, None, None, None, None


def prefix_norms(x: torch.Tensor, dims) -> torch.Tensor:
    """[N, K]: |x[:, :d_k]| in the accumulation dtype (not clamped, not differentiated)."""
    with torch.no_grad():
        xa = x.to(backends.accumulation_dtype(x.dtype))
        return torch.stack([torch.linalg.vector_norm(xa[:, :d], dim=1) for d in dims], 1)


def _through_norms(grad, x, sds, norms, dims, eps):
    """grad (the engine's d loss / d x at fixed scales, accumulation dtype, [N, D], updated in place)
    plus the path through the scales c_k = 1 / max(|x[:d_k]|, eps) (times 1/T for alpha):
    d loss / d c_k = sds_k / c_k and d c_k / d x[:d_k] = -c_k x[:d_k] / n_k^2 where n_k >= eps (0
    below, the clamp), so x[d] gets x[d] * sum_{k : d < d_k} -sds_k / n_k^2: a suffix sum over the
    prefixes, constant on each segment [d_{k-1}, d_k)."""
    coef = torch.where(norms >= eps, -sds / (norms * norms).clamp_min(eps * eps), torch.zeros_like(sds))
    suffix = coef.flip(1).cumsum(1).flip(1)  # [N, K]: sum over k' >= k
    xa = x.to(grad.dtype)
    lo = 0
    for k, hi in enumerate(dims):
        grad[:, lo:hi] += xa[:, lo:hi] * suffix[:, k:k + 1]
        lo = hi
    return grad


class NormalizedPrefixContrastiveFunction(torch.autograd.Function):
    """The engine with each prefix L2-normalised (Matryoshka): alpha = 1 / (T max(|q[:d_k]|, eps)) and
    beta = 1 / max(|p[:d_k]|, eps) are formed in forward; backward adds the chain rule through the
    prefix norms (_through_norms) to the engine's fixed-scale gradients in the accumulation dtype and
    rounds to the input dtype once (two bf16-rounded terms that largely cancel would lose digits).
    forward(q, p, temperature, positive_index, passage_ids, dims, weights, margin, delta, eps, backend)
    -> (loss, ranks [B, K], masked [B, K])."""

    @staticmethod
    def forward(ctx, q, p, temperature, positive_index, passage_ids, dims, weights, margin, delta, eps, backend):
        nq, np_ = prefix_norms(q, dims), prefix_norms(p, dims)
        alpha = 1.0 / (temperature * nq.clamp_min(eps))
        beta = 1.0 / np_.clamp_min(eps)
        loss, ranks, masked, lse, s_pos, w = _engine_forward(ctx, backend, q, p, alpha, beta, positive_index,
                                                             passage_ids, dims, weights, margin, delta)
        ctx.eps = eps
        ctx.save_for_backward(q, p, alpha, beta, nq, np_, positive_index, passage_ids, lse, s_pos, w)
        return loss, ranks, masked

    @staticmethod
    def backward(ctx, grad_loss, _grad_ranks, _grad_masked):
        q, p, alpha, beta, nq, np_, pos, ids, lse, s_pos, w = ctx.saved_tensors
        need_q, need_p = ctx.needs_input_grad[:2]
        if not (need_q or need_p):
            return (None,) * 11
        coef = (grad_loss.to(lse.dtype) / q.shape[0]) * w
        dq, dp, row_sds, col_sds = ctx.launch.backward(q, p, alpha, beta, pos, ids, lse, s_pos, coef, ctx.dims,
                                                       ctx.margin, ctx.delta, need_q, need_p, need_q, need_p,
                                                       acc_grads=True)
        if need_q:
            dq = _through_norms(dq, q, row_sds, nq, ctx.dims, ctx.eps).to(q.dtype)
        if need_p:
            dp = _through_norms(dp, p, col_sds, np_, ctx.dims, ctx.eps).to(p.dtype)
        return dq, dp, None, None, None, None, None, None, None, None, None


def normalized_prefix_contrastive(q, p, temperature, dims, weights, positive_index, passage_ids, margin, delta,
                                  backend: str, eps: float = 1e-12):
    """Matryoshka on a fast backend: dims strictly increasing, inputs checked by the caller; margin /
    delta in score units (cos / T)."""
    return NormalizedPrefixContrastiveFunction.apply(
        q.contiguous(), p.contiguous(), float(temperature), positive_index.to(torch.int64).contiguous(),
        None if passage_ids is None else passage_ids.to(torch.int64).contiguous(),
        tuple(int(d) for d in dims), tuple(float(x) for x in weights),
        None if margin is None else float(margin), None if delta is None else float(delta), float(eps), backend)


def prefix_contrastive(q, p, alpha, beta, dims, weights, positive_index, passage_ids, margin, delta, backend: str):
    """The engine on a fast backend ("cpp" or "triton"); inputs already checked by the caller.
    dims strictly increasing; alpha / beta [B, K] / [P, K] in the accumulation dtype (may require grad)."""
    acc = backends.accumulation_dtype(q.dtype)
    return PrefixContrastiveFunction.apply(
        q.contiguous(), p.contiguous(), alpha.to(acc).contiguous(), beta.to(acc).contiguous(),
        positive_index.to(torch.int64).contiguous(),
        None if passage_ids is None else passage_ids.to(torch.int64).contiguous(),
        tuple(int(d) for d in dims), tuple(float(x) for x in weights),
        None if margin is None else float(margin), None if delta is None else float(delta), backend)

"""Triton kernels for prefix_contrastive (see embedcore/ops/prefix_contrastive.py for the maths
and the reference): InfoNCE over K nested prefixes d_1 < ... < d_K of D in one pass, per-row and
per-column score scales, id masking and false-negative filtering. No [B, P] tensor exists.

One pass over the prefixes: a score tile's dot products accumulate segment by segment
([0, d_1), [d_1, d_2), ...); right after segment k the accumulator holds the prefix-k dot
products, and prefix k's scores, filter, online log-sum-exp (forward) or dS^k (backward) are
taken from it. The per-prefix row state (max, sum, counts) lives in [BLOCK_M, KP] registers,
KP = next power of 2 of K, one column per prefix.

Backward, A^k = dS^k alpha_k beta_k: output column d in segment c takes sum_{k >= c} A^k. A
program owns one chunk of output columns and cannot slice its register tile by segment, so it
uses Y_k = A^1 + ... + A^k: the chunk gets Y_K p[:, chunk] minus, for each c > 1, Y_{c-1}
p[:, chunk & segment c] (p masked to the segment). A chunk that spans m prefix boundaries thus
costs m + 1 gradient GEMMs per tile instead of 1 (for D <= 256 on a GPU, where one chunk covers
D, that is K GEMMs); the score GEMM is still one full width. dq and dp are two kernels as in
kernels/contrastive.py (no atomics: reproducible bits).

Limits, stated honestly: the same as kernels/contrastive.py (int32 offsets, fp32 inputs without
TF32, bf16 tl.dot with fp32 accumulation, untested on a GPU: the interpreter runs every test).
The dp kernel forms its score tile as p q^T: its rounding may differ from the forward's in the
last bit, so a score within an ulp of the filter threshold could be filtered in one pass and
not the other (a measure-zero tie, as with the ranks).
"""
import torch
import triton
import triton.language as tl

from embedcore.kernels._common import acc_type, dot_precision, dot_upcast, positive_and_kept, score_blocks


@triton.jit
def _col(x, kk, k):
    """Column k of a [M, KP] per-prefix state as [M] (float states)."""
    return tl.sum(tl.where(kk[None, :] == k, x, 0.0), axis=1)


@triton.jit
def _threshold(sp, margin, delta, HAS_MARGIN: tl.constexpr, HAS_DELTA: tl.constexpr):
    """min(margin * s_pos, s_pos - delta), each term only when its rule is on."""
    thr = tl.full(sp.shape, float("inf"), sp.dtype)
    if HAS_MARGIN:
        thr = tl.minimum(thr, margin * sp)
    if HAS_DELTA:
        thr = tl.minimum(thr, sp - delta)
    return thr


@triton.jit
def _add_segment(acc, a_ptr, b_ptr, a_rows, b_rows, a_ok, b_ok, lo, hi, D, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc [rows of a, rows of b] += a[a_rows, lo:hi] b[b_rows, lo:hi]^T."""
    for d0 in range(lo, hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < hi
        av = tl.load(a_ptr + a_rows[:, None] * D + offs_d[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        bv = tl.load(b_ptr + b_rows[None, :] * D + offs_d[:, None], mask=b_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_UPCAST:
            av, bv = av.to(ACC), bv.to(ACC)
        acc = tl.dot(av, bv, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gemm_acc(coef, x, acc, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc += coef @ x, coef in the accumulation dtype (rounded to x's dtype on a GPU for bf16)."""
    if DOT_UPCAST:
        return tl.dot(coef, x.to(coef.dtype), acc, input_precision=PRECISION)
    return tl.dot(coef.to(x.dtype), x, acc, input_precision=PRECISION)


@triton.jit
def _forward_kernel(q_ptr, p_ptr, alpha_ptr, beta_ptr, dims_ptr, pos_ptr, ids_ptr, lse_ptr, spos_ptr, rank_ptr,
                    masked_ptr, B, P, D, margin, delta,
                    K: tl.constexpr, KP: tl.constexpr, HAS_IDS: tl.constexpr, HAS_MARGIN: tl.constexpr,
                    HAS_DELTA: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    kk = tl.arange(0, KP)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    pos_id = tl.load(ids_ptr + pos, mask=row_ok, other=0) if HAS_IDS else pos
    # s_pos of every prefix: one row-wise sweep over d, snapshotted at each boundary.
    sp = tl.zeros([BLOCK_M, KP], dtype=ACC)
    run = tl.zeros([BLOCK_M], dtype=ACC)
    lo = 0
    for k in tl.static_range(K):
        hi = tl.load(dims_ptr + k)
        for d0 in range(lo, hi, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m2 = row_ok[:, None] & (offs_d < hi)[None, :]
            qv = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            pv = tl.load(p_ptr + pos[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            run += tl.sum(qv * pv, axis=1)
        a = tl.load(alpha_ptr + rows * K + k, mask=row_ok, other=0.0)
        b = tl.load(beta_ptr + pos * K + k, mask=row_ok, other=0.0)
        sp = tl.where(kk[None, :] == k, (run * a * b)[:, None], sp)
        lo = hi
    run_max = tl.full([BLOCK_M, KP], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_M, KP], dtype=ACC)
    beaten = tl.zeros([BLOCK_M, KP], dtype=tl.int32)
    masked = tl.zeros([BLOCK_M, KP], dtype=tl.int32)
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        is_pos, keep0 = positive_and_kept(cols, col_ok, row_ok, pos, pos_id, ids_ptr, HAS_IDS)
        dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        lo = 0
        for k in tl.static_range(K):
            hi = tl.load(dims_ptr + k)
            dot = _add_segment(dot, q_ptr, p_ptr, rows, cols, row_ok, col_ok, lo, hi, D, ACC, PRECISION, DOT_UPCAST,
                               BLOCK_D)
            lo = hi
            a = tl.load(alpha_ptr + rows * K + k, mask=row_ok, other=0.0)
            b = tl.load(beta_ptr + cols * K + k, mask=col_ok, other=0.0)
            s = dot * a[:, None] * b[None, :]
            sp_k = _col(sp, kk, k)
            keep = keep0
            if HAS_MARGIN or HAS_DELTA:
                fn = keep0 & ~is_pos & (s > _threshold(sp_k, margin, delta, HAS_MARGIN, HAS_DELTA)[:, None])
                masked = tl.where(kk[None, :] == k, masked + tl.sum(fn.to(tl.int32), axis=1)[:, None], masked)
                keep = keep0 & ~fn
            s = tl.where(keep, s, float("-inf"))
            count = tl.sum(((s > sp_k[:, None]) & ~is_pos).to(tl.int32), axis=1)
            beaten = tl.where(kk[None, :] == k, beaten + count[:, None], beaten)
            m_old = _col(run_max, kk, k)
            l_old = _col(run_sum, kk, k)
            new_max = tl.maximum(m_old, tl.max(s, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing counted yet
            l_new = l_old * tl.exp(m_old - safe_max) + tl.sum(tl.exp(s - safe_max[:, None]), axis=1)
            run_max = tl.where(kk[None, :] == k, new_max[:, None], run_max)
            run_sum = tl.where(kk[None, :] == k, l_new[:, None], run_sum)
    state_ok = row_ok[:, None] & (kk < K)[None, :]
    offs = rows[:, None] * K + kk[None, :]
    lse = run_max + tl.log(tl.where(state_ok, run_sum, 1.0))
    tl.store(lse_ptr + offs, lse, mask=state_ok)
    tl.store(spos_ptr + offs, sp, mask=state_ok)
    tl.store(rank_ptr + offs, (beaten + 1).to(tl.int64), mask=state_ok)
    tl.store(masked_ptr + offs, masked.to(tl.int64), mask=state_ok)


@triton.jit
def _dq_kernel(q_ptr, p_ptr, alpha_ptr, beta_ptr, dims_ptr, pos_ptr, ids_ptr, lse_ptr, spos_ptr, coef_ptr, dq_ptr,
               rsds_ptr, B, P, D, margin, delta,
               K: tl.constexpr, KP: tl.constexpr, HAS_IDS: tl.constexpr, HAS_MARGIN: tl.constexpr,
               HAS_DELTA: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dq[rows, chunk] and (from the first chunk's programs) sum_j dS^k s^k per row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    o_lo = tl.program_id(1) * BLOCK_DO
    offs_o = o_lo + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    kk = tl.arange(0, KP)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    pos_id = tl.load(ids_ptr + pos, mask=row_ok, other=0) if HAS_IDS else pos
    d_last = tl.load(dims_ptr + K - 1)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    sds = tl.zeros([BLOCK_M, KP], dtype=ACC)
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        is_pos, keep0 = positive_and_kept(cols, col_ok, row_ok, pos, pos_id, ids_ptr, HAS_IDS)
        dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        Y = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        lo = 0
        for k in tl.static_range(K):
            hi = tl.load(dims_ptr + k)
            dot = _add_segment(dot, q_ptr, p_ptr, rows, cols, row_ok, col_ok, lo, hi, D, ACC, PRECISION, DOT_UPCAST,
                               BLOCK_D)
            lo = hi
            a = tl.load(alpha_ptr + rows * K + k, mask=row_ok, other=0.0)
            b = tl.load(beta_ptr + cols * K + k, mask=col_ok, other=0.0)
            s = dot * a[:, None] * b[None, :]
            lse_k = tl.load(lse_ptr + rows * K + k, mask=row_ok, other=0.0)
            keep = keep0
            if HAS_MARGIN or HAS_DELTA:
                sp_k = tl.load(spos_ptr + rows * K + k, mask=row_ok, other=0.0)
                keep = keep0 & ~(~is_pos & (s > _threshold(sp_k, margin, delta, HAS_MARGIN, HAS_DELTA)[:, None]))
            prob = tl.where(keep, tl.exp(s - lse_k[:, None]), 0.0)
            ds = (prob - (is_pos & row_ok[:, None]).to(ACC)) * tl.load(coef_ptr + k)
            sds = tl.where(kk[None, :] == k, sds + tl.sum(ds * s, axis=1)[:, None], sds)
            Y += ds * a[:, None] * b[None, :]
            if k < K - 1:  # columns [d_k, d_{k+1}) of this chunk take all prefixes but the first k + 1
                nxt = tl.load(dims_ptr + k + 1)
                if (nxt > o_lo) & (hi < o_lo + BLOCK_DO):
                    seg = (offs_o >= hi) & (offs_o < nxt)
                    pv = tl.load(p_ptr + cols[:, None] * D + offs_o[None, :], mask=col_ok[:, None] & seg[None, :],
                                 other=0.0)
                    acc = _gemm_acc(-Y, pv, acc, PRECISION, DOT_UPCAST)
        pv = tl.load(p_ptr + cols[:, None] * D + offs_o[None, :],
                     mask=col_ok[:, None] & (offs_o < d_last)[None, :], other=0.0)
        acc = _gemm_acc(Y, pv, acc, PRECISION, DOT_UPCAST)
    tl.store(dq_ptr + rows[:, None] * D + offs_o[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & o_ok[None, :])
    if tl.program_id(1) == 0:  # every chunk's programs hold the same sums; one writes them
        tl.store(rsds_ptr + rows[:, None] * K + kk[None, :], sds, mask=row_ok[:, None] & (kk < K)[None, :])


@triton.jit
def _dp_kernel(q_ptr, p_ptr, alpha_ptr, beta_ptr, dims_ptr, pos_ptr, ids_ptr, lse_ptr, spos_ptr, coef_ptr, dp_ptr,
               csds_ptr, B, P, D, margin, delta,
               K: tl.constexpr, KP: tl.constexpr, HAS_IDS: tl.constexpr, HAS_MARGIN: tl.constexpr,
               HAS_DELTA: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dp[cols, chunk] and sum_i dS^k s^k per column; score tiles transposed, [passages, queries]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < P
    o_lo = tl.program_id(1) * BLOCK_DO
    offs_o = o_lo + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    kk = tl.arange(0, KP)
    col_id = tl.load(ids_ptr + cols, mask=col_ok, other=0) if HAS_IDS else cols
    d_last = tl.load(dims_ptr + K - 1)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=ACC)
    sds = tl.zeros([BLOCK_N, KP], dtype=ACC)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        is_pos = cols[:, None] == pos[None, :]
        keep0 = col_ok[:, None] & row_ok[None, :]  # padded query rows must not contribute exp(0 - 0) = 1
        if HAS_IDS:
            pos_id = tl.load(ids_ptr + pos, mask=row_ok, other=0)
            keep0 = keep0 & ~((col_id[:, None] == pos_id[None, :]) & ~is_pos)
        dot = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        Y = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        lo = 0
        for k in tl.static_range(K):
            hi = tl.load(dims_ptr + k)
            dot = _add_segment(dot, p_ptr, q_ptr, cols, rows, col_ok, row_ok, lo, hi, D, ACC, PRECISION, DOT_UPCAST,
                               BLOCK_D)
            lo = hi
            a = tl.load(alpha_ptr + rows * K + k, mask=row_ok, other=0.0)
            b = tl.load(beta_ptr + cols * K + k, mask=col_ok, other=0.0)
            st = dot * a[None, :] * b[:, None]  # (dot * alpha) * beta, the forward's order of rounding
            lse_k = tl.load(lse_ptr + rows * K + k, mask=row_ok, other=0.0)
            keep = keep0
            if HAS_MARGIN or HAS_DELTA:
                sp_k = tl.load(spos_ptr + rows * K + k, mask=row_ok, other=0.0)
                keep = keep0 & ~(~is_pos & (st > _threshold(sp_k, margin, delta, HAS_MARGIN, HAS_DELTA)[None, :]))
            prob = tl.where(keep, tl.exp(st - lse_k[None, :]), 0.0)
            ds_t = (prob - (is_pos & row_ok[None, :]).to(ACC)) * tl.load(coef_ptr + k)
            sds = tl.where(kk[None, :] == k, sds + tl.sum(ds_t * st, axis=1)[:, None], sds)
            Y += ds_t * a[None, :] * b[:, None]
            if k < K - 1:
                nxt = tl.load(dims_ptr + k + 1)
                if (nxt > o_lo) & (hi < o_lo + BLOCK_DO):
                    seg = (offs_o >= hi) & (offs_o < nxt)
                    qv = tl.load(q_ptr + rows[:, None] * D + offs_o[None, :], mask=row_ok[:, None] & seg[None, :],
                                 other=0.0)
                    acc = _gemm_acc(-Y, qv, acc, PRECISION, DOT_UPCAST)
        qv = tl.load(q_ptr + rows[:, None] * D + offs_o[None, :],
                     mask=row_ok[:, None] & (offs_o < d_last)[None, :], other=0.0)
        acc = _gemm_acc(Y, qv, acc, PRECISION, DOT_UPCAST)
    tl.store(dp_ptr + cols[:, None] * D + offs_o[None, :], acc.to(dp_ptr.dtype.element_ty),
             mask=col_ok[:, None] & o_ok[None, :])
    if tl.program_id(1) == 0:  # every chunk's programs hold the same sums; one writes them
        tl.store(csds_ptr + cols[:, None] * K + kk[None, :], sds, mask=col_ok[:, None] & (kk < K)[None, :])


def _launch_args(q, dims, passage_ids, positive_index, margin, delta):
    K = len(dims)
    dims_t = torch.tensor(dims, dtype=torch.int32).to(q.device, non_blocking=True)
    has_ids = passage_ids is not None
    flags = dict(K=K, KP=max(2, triton.next_power_of_2(K)), HAS_IDS=has_ids, HAS_MARGIN=margin is not None,
                 HAS_DELTA=delta is not None, ACC=acc_type(q.dtype), PRECISION=dot_precision(q.dtype),
                 DOT_UPCAST=dot_upcast(q))
    ids = passage_ids if has_ids else positive_index  # a valid pointer, never read
    scalars = (0.0 if margin is None else float(margin), 0.0 if delta is None else float(delta))
    return dims_t, ids, flags, scalars


def forward(q, p, alpha, beta, positive_index, passage_ids, dims, margin, delta):
    """-> (lse [B, K], s_pos [B, K], ranks [B, K] int64, masked [B, K] int64)."""
    B, D = q.shape
    P, K = p.shape[0], len(dims)
    acc_dtype = alpha.dtype
    lse = torch.empty(B, K, device=q.device, dtype=acc_dtype)
    s_pos = torch.empty(B, K, device=q.device, dtype=acc_dtype)
    ranks = torch.empty(B, K, device=q.device, dtype=torch.int64)
    masked = torch.empty(B, K, device=q.device, dtype=torch.int64)
    bm, bn, bd, _, warps = score_blocks(D, q.device)
    dims_t, ids, flags, (m, d) = _launch_args(q, dims, passage_ids, positive_index, margin, delta)
    _forward_kernel[(triton.cdiv(B, bm),)](
        q, p, alpha, beta, dims_t, positive_index, ids, lse, s_pos, ranks, masked, B, P, D, m, d,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, **flags)
    return lse, s_pos, ranks, masked


def backward(q, p, alpha, beta, positive_index, passage_ids, lse, s_pos, coef, dims, margin, delta,
                    need_q, need_p, need_alpha, need_beta, acc_grads=False):
    """-> (dq, dp, sum_j dS s [B, K], sum_i dS s [P, K]), None where not needed; coef [K] = g w / B on
    the device (read by the kernels: no host sync). dq, dp in the input dtype, or in the
    accumulation dtype with acc_grads (for a caller that adds terms before rounding once)."""
    B, D = q.shape
    P, K = p.shape[0], len(dims)
    bm, bn, bd, bdo, warps = score_blocks(D, q.device)
    dims_t, ids, flags, (m, d) = _launch_args(q, dims, passage_ids, positive_index, margin, delta)
    coef = coef.to(device=q.device, dtype=lse.dtype).contiguous()
    grad_dtype = lse.dtype if (acc_grads or dot_upcast(q)) else q.dtype
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo, num_warps=warps, **flags)
    dq = dp = row = col = None
    if need_q or need_alpha:
        dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
        row = torch.empty(B, K, device=q.device, dtype=lse.dtype)
        _dq_kernel[(triton.cdiv(B, bm), triton.cdiv(D, bdo))](
            q, p, alpha, beta, dims_t, positive_index, ids, lse, s_pos, coef, dq, row, B, P, D, m, d, **common)
    if need_p or need_beta:
        dp = torch.empty(p.shape, device=p.device, dtype=grad_dtype)
        col = torch.empty(P, K, device=q.device, dtype=lse.dtype)
        _dp_kernel[(triton.cdiv(P, bn), triton.cdiv(D, bdo))](
            q, p, alpha, beta, dims_t, positive_index, ids, lse, s_pos, coef, dp, col, B, P, D, m, d, **common)
    if grad_dtype != q.dtype and not acc_grads:
        dq = None if dq is None else dq.to(q.dtype)
        dp = None if dp is None else dp.to(p.dtype)
    return (dq if need_q else None, dp if need_p else None, row if need_alpha else None,
            col if need_beta else None)

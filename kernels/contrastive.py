"""Triton kernels for contrastive_loss (see embedcore/ops/contrastive.py for the maths and the
reference). No [B, P] tensor exists: every score tile lives in registers only.

Forward (grid over query blocks, loop over passage blocks): s = q p^T / T tile by tile with
tl.dot (D looped in BLOCK_D chunks), an online log-sum-exp per row over the non-excluded
columns, and the count of columns scoring strictly above the positive (rank - 1). Writes
lse [B], row_loss [B] = lse - s_pos, ranks [B]: O(B) memory.

Backward, with g the loss gradient and scale = g / (B T):
    dS_ij = scale * (exp(s_ij - lse_i) [j not excluded] - [j == pos(i)])
    dq = dS p        (kernel over query blocks, looping over passage blocks)
    dp = dS^T q      (kernel over passage blocks, looping over query blocks)
Two kernels, each recomputing its score tiles, rather than one kernel with atomic adds into dq:
the atomics would make the gradient's summation order (hence its bits) vary run to run, and
cost as much traffic as the extra recompute for the D this loss sees. Each program owns its
output rows and keeps its accumulator in registers, so nothing is read back from global memory.

Limits, stated honestly:
- The output width per program is at most 256 columns of D; for D > 256 the backward grid
  gains a D axis and each program recomputes its score tiles, so the backward costs about
  ceil(D / 256) times the ideal for very wide embeddings (D = 2048: 8x the score GEMMs).
- fp32 inputs use input_precision="ieee" (no TF32): the scores are divided by a temperature
  as small as 0.01, which would amplify TF32's 1e-3 relative error into the logits.
- bf16/fp16 inputs: tl.dot in the input dtype with fp32 accumulation; dS is rounded to the
  input dtype for the gradient GEMMs (one rounding, like any bf16 matmul backward).
- Accumulation is fp32 (fp64 for fp64 inputs, interpreter only in practice).
- Ties in the rank are decided on the fp32 scores; s_pos is a separate fp32 dot of the two rows.
- Offsets are int32: B * D and P * D must stay below 2**31 (P = 65536 at D = 4096 is 2**28).
- Untested on a GPU so far (no device was lent to the task that wrote them): the interpreter
  runs every test; benchmarks/gpu.sh runs them, and the CUDA benchmark cases, on CUDA.
"""
import torch
import triton
import triton.language as tl

from embedcore.kernels._common import acc_type, dot_precision, dot_upcast, positive_and_kept, score_blocks


@triton.jit
def _score_tile(q_ptr, p_ptr, rows, cols, row_ok, col_ok, D, ACC: tl.constexpr, PRECISION: tl.constexpr,
                DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_M, BLOCK_N] = q[rows] p[cols]^T, D looped in BLOCK_D chunks (masked rows give 0)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        qv = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        pv = tl.load(p_ptr + cols[None, :] * D + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_UPCAST:
            qv, pv = qv.to(ACC), pv.to(ACC)
        acc = tl.dot(qv, pv, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward_kernel(q_ptr, p_ptr, pos_ptr, ids_ptr, lse_ptr, loss_ptr, rank_ptr, B, P, D, inv_t,
                    HAS_IDS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    pos_id = tl.load(ids_ptr + pos, mask=row_ok, other=0) if HAS_IDS else pos
    # s_pos: the positive's score, as a row-wise dot (needed before the scan, for the ranks).
    s_pos = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m2 = row_ok[:, None] & (offs_d < D)[None, :]
        qv = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
        pv = tl.load(p_ptr + pos[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
        s_pos += tl.sum(qv * pv, axis=1)
    s_pos = s_pos * inv_t
    run_max = tl.full([BLOCK_M], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_M], dtype=ACC)
    beaten = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        s = _score_tile(q_ptr, p_ptr, rows, cols, row_ok, col_ok, D, ACC, PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_D) * inv_t
        is_pos, keep = positive_and_kept(cols, col_ok, row_ok, pos, pos_id, ids_ptr, HAS_IDS)
        s = tl.where(keep, s, float("-inf"))
        beaten += tl.sum(((s > s_pos[:, None]) & ~is_pos).to(tl.int32), axis=1)
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing counted yet
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(s - safe_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(tl.where(row_ok, run_sum, 1.0))  # padded rows: no log(0) warnings
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - s_pos, mask=row_ok)
    tl.store(rank_ptr + rows, (beaten + 1).to(tl.int64), mask=row_ok)


@triton.jit
def _dq_kernel(q_ptr, p_ptr, pos_ptr, ids_ptr, lse_ptr, scale_ptr, dq_ptr, B, P, D, inv_t,
               HAS_IDS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dq[rows, d-chunk] = sum over passage blocks of dS[rows, cols] p[cols, d-chunk]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    pos_id = tl.load(ids_ptr + pos, mask=row_ok, other=0) if HAS_IDS else pos
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        s = _score_tile(q_ptr, p_ptr, rows, cols, row_ok, col_ok, D, ACC, PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_D) * inv_t
        is_pos, keep = positive_and_kept(cols, col_ok, row_ok, pos, pos_id, ids_ptr, HAS_IDS)
        prob = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        ds = (prob - is_pos.to(ACC)) * scale
        pv = tl.load(p_ptr + cols[:, None] * D + offs_o[None, :], mask=col_ok[:, None] & o_ok[None, :], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(ds, pv.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(ds.to(pv.dtype), pv, acc, input_precision=PRECISION)
    tl.store(dq_ptr + rows[:, None] * D + offs_o[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & o_ok[None, :])


@triton.jit
def _dp_kernel(q_ptr, p_ptr, pos_ptr, ids_ptr, lse_ptr, scale_ptr, dp_ptr, B, P, D, inv_t,
               HAS_IDS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dp[cols, d-chunk] = sum over query blocks of dS[rows, cols]^T q[rows, d-chunk]; the score
    tile is used transposed, [BLOCK_N passages, BLOCK_M queries]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < P
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    col_id = tl.load(ids_ptr + cols, mask=col_ok, other=0) if HAS_IDS else cols
    scale = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=ACC)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        # The tile in the forward's operand order (q rows x p cols), then transposed: the same
        # products as the lse was built from, so exp(s - lse) of a confident positive does not
        # pick up a rounding difference that dS = softmax - 1 would amplify.
        st = tl.trans(_score_tile(q_ptr, p_ptr, rows, cols, row_ok, col_ok, D, ACC, PRECISION, DOT_UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_D)) * inv_t
        is_pos = cols[:, None] == pos[None, :]
        keep = col_ok[:, None] & row_ok[None, :]  # padded query rows must not contribute exp(0 - 0) = 1
        if HAS_IDS:
            pos_id = tl.load(ids_ptr + pos, mask=row_ok, other=0)
            keep = keep & ~((col_id[:, None] == pos_id[None, :]) & ~is_pos)
        prob = tl.where(keep, tl.exp(st - lse[None, :]), 0.0)
        ds_t = (prob - (is_pos & row_ok[None, :]).to(ACC)) * scale
        qv = tl.load(q_ptr + rows[:, None] * D + offs_o[None, :], mask=row_ok[:, None] & o_ok[None, :], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(ds_t, qv.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(ds_t.to(qv.dtype), qv, acc, input_precision=PRECISION)
    tl.store(dp_ptr + cols[:, None] * D + offs_o[None, :], acc.to(dp_ptr.dtype.element_ty),
             mask=col_ok[:, None] & o_ok[None, :])


def forward(q, p, positive_index, passage_ids, temperature):
    """-> (lse [B], row_loss [B], ranks [B] int64); lse and row_loss in the accumulation dtype."""
    B, D = q.shape
    P = p.shape[0]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(B, device=q.device, dtype=acc_dtype)
    row_loss = torch.empty(B, device=q.device, dtype=acc_dtype)
    ranks = torch.empty(B, device=q.device, dtype=torch.int64)
    bm, bn, bd, _, warps = score_blocks(D, q.device)
    has_ids = passage_ids is not None
    ids = passage_ids if has_ids else positive_index  # a valid pointer, never read
    _forward_kernel[(triton.cdiv(B, bm),)](
        q, p, positive_index, ids, lse, row_loss, ranks, B, P, D, 1.0 / temperature,
        HAS_IDS=has_ids, ACC=acc_type(q.dtype), PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
    )
    return lse, row_loss, ranks


def backward(q, p, positive_index, passage_ids, lse, scale, temperature, need_q, need_p):
    """-> (dq or None, dp or None) in the input dtype; scale = g / (B T), a 0-dim tensor on the
    device (read by the kernels, so no host sync)."""
    B, D = q.shape
    P = p.shape[0]
    bm, bn, bd, bdo, warps = score_blocks(D, q.device)
    has_ids = passage_ids is not None
    ids = passage_ids if has_ids else positive_index
    scale = scale.to(device=q.device, dtype=lse.dtype).reshape(1)
    common = dict(HAS_IDS=has_ids, ACC=acc_type(q.dtype), PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo, num_warps=warps)
    grad_dtype = lse.dtype if dot_upcast(q) else q.dtype
    dq = dp = None
    if need_q:
        dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
        _dq_kernel[(triton.cdiv(B, bm), triton.cdiv(D, bdo))](
            q, p, positive_index, ids, lse, scale, dq, B, P, D, 1.0 / temperature, **common)
    if need_p:
        dp = torch.empty(p.shape, device=p.device, dtype=grad_dtype)
        _dp_kernel[(triton.cdiv(P, bn), triton.cdiv(D, bdo))](
            q, p, positive_index, ids, lse, scale, dp, B, P, D, 1.0 / temperature, **common)
    if grad_dtype != q.dtype:
        dq = None if dq is None else dq.to(q.dtype)
        dp = None if dp is None else dp.to(p.dtype)
    return dq, dp

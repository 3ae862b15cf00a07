"""Triton kernels for maxsim_contrastive_loss and maxsim_scores (see embedcore/ops/maxsim.py for the
maths, the tie rule and the reference). No [B, P, Lq, Lp] tensor exists: the similarities of one
(query, passage) pair live in registers, BLOCK_T passage tokens at a time.

_pair (the one piece every kernel shares): for query b and passage j, sim = q[b] p[j]^T by tl.dot
in [BLOCK_Q, BLOCK_T] chunks (D looped in BLOCK_D), padding set to -inf by selection (so whatever a
padded token holds never reaches the max), a running max and FIRST argmax per query token across
the chunks (tl.argmax with tie_break_left inside a chunk, strict > across chunks), and
S = sum of the maxima over the real query tokens.

Forward: grid (B, passage splits); each program computes s_pos = S[b, pos(b)] / T with _pair (the
same code as every other score, so ties in the rank compare equal values), then an online
log-sum-exp and the count of passages beating s_pos over its split. The partial (max, sum, count)
of the splits are folded in torch ([B, splits], tiny; no host sync).
Backward, dS_bj = scale (exp(S_bj / T - lse_b) [kept] - [j == pos(b)]), scale = g / (B T):
    dq kernel, grid (B, D chunks): loops over the passages, recomputes _pair, gathers
        p[j, t*(b, i, j)] and accumulates dS_bj times it in registers;
    dp kernel, grid (P, token chunks, D chunks): loops over the queries, recomputes _pair over the
        whole passage (the argmax needs every token), builds W[i, t] = dS_bj [t == t*(b, i, j)]
        for its own token chunk and accumulates W^T q[b] with tl.dot.
Two kernels that each own their output rows, rather than one with atomic adds into dp: the
summation order (hence the bits) stays fixed from run to run, as in kernels/contrastive.py.

Limits, stated honestly:
- Untested on a GPU so far (no device was lent to the task that wrote them): the interpreter runs
  every test; benchmarks/gpu.sh runs the CUDA tests and the CUDA benchmark case.
- One program holds a [BLOCK_Q, BLOCK_T] tile with BLOCK_Q = next_pow2(Lq) >= 16: long queries
  (Lq > 512) shrink BLOCK_T to 16 and get slow; the dp kernel recomputes each pair once per token
  chunk it owns (ceil(Lp / BLOCK_T) times) and both backward kernels once per D chunk
  (ceil(D / BLOCK_DO)): for Lp = 256 and D = 128 on a GPU, 2 recomputes in dp, 1 in dq.
- fp32 inputs use input_precision="ieee" (no TF32: S sums Lq maxima and is divided by a
  temperature); bf16/fp16: tl.dot in the input dtype with fp32 accumulation, W rounded to the input
  dtype for the dp product (one rounding, like any bf16 matmul backward).
- Offsets are int32: B * Lq * D and P * Lp * D must stay below 2**31.
"""
import torch
import triton
import triton.language as tl

from embedcore.kernels._common import acc_type, dot_precision, dot_upcast


@triton.jit
def _pair(q_ptr, qm_ptr, p_ptr, pm_ptr, b, j, Lq, Lp, D, ACC: tl.constexpr, PRECISION: tl.constexpr,
          DOT_UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(S[b, j], t* [BLOCK_Q] int32, counted [BLOCK_Q]): counted = real query token and the
    passage has a real token (then t* is the first real token reaching the max)."""
    offs_i = tl.arange(0, BLOCK_Q)
    i_ok = offs_i < Lq
    q_real = (tl.load(qm_ptr + b * Lq + offs_i, mask=i_ok, other=0) != 0) & i_ok
    run_max = tl.full([BLOCK_Q], float("-inf"), ACC)
    run_arg = tl.full([BLOCK_Q], -1, tl.int32)
    for t0 in range(0, Lp, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < Lp
        t_real = (tl.load(pm_ptr + j * Lp + offs_t, mask=t_ok, other=0) != 0) & t_ok
        sim = tl.zeros([BLOCK_Q, BLOCK_T], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            qv = tl.load(q_ptr + (b * Lq + offs_i)[:, None] * D + offs_d[None, :],
                         mask=i_ok[:, None] & d_ok[None, :], other=0.0)
            pv = tl.load(p_ptr + (j * Lp + offs_t)[None, :] * D + offs_d[:, None],
                         mask=t_ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_UPCAST:
                qv, pv = qv.to(ACC), pv.to(ACC)
            sim = tl.dot(qv, pv, sim, input_precision=PRECISION)
        sim = tl.where(t_real[None, :], sim, float("-inf"))
        c_max = tl.max(sim, axis=1)
        c_arg = tl.argmax(sim, axis=1, tie_break_left=True).to(tl.int32) + t0
        better = (c_max > run_max) | ((run_arg < 0) & (tl.sum(t_real.to(tl.int32), axis=0) > 0))
        run_arg = tl.where(better, c_arg, run_arg)
        run_max = tl.where(better, c_max, run_max)
    counted = q_real & (run_arg >= 0)
    return tl.sum(tl.where(counted, run_max, 0.0), axis=0), run_arg, counted


@triton.jit
def _kept(j, pos, pos_id, ids_ptr, HAS_IDS: tl.constexpr):
    """Passage j counts in the denominator of a query whose positive is pos (id pos_id)."""
    if HAS_IDS:
        return (tl.load(ids_ptr + j) != pos_id) | (j == pos)
    return j >= 0


@triton.jit
def _scores_kernel(q_ptr, qm_ptr, p_ptr, pm_ptr, out_ptr, P, Lq, Lp, D, PER_PROGRAM,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    j0 = tl.program_id(1) * PER_PROGRAM
    for j in range(j0, tl.minimum(j0 + PER_PROGRAM, P)):
        s, _, _ = _pair(q_ptr, qm_ptr, p_ptr, pm_ptr, b, j, Lq, Lp, D, ACC, PRECISION, DOT_UPCAST,
                        BLOCK_Q, BLOCK_T, BLOCK_D)
        tl.store(out_ptr + b * P + j, s)


@triton.jit
def _forward_kernel(q_ptr, qm_ptr, p_ptr, pm_ptr, pos_ptr, ids_ptr, spos_ptr, part_max_ptr, part_sum_ptr,
                    part_beaten_ptr, P, Lq, Lp, D, inv_t, PER_PROGRAM,
                    HAS_IDS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    pos = tl.load(pos_ptr + b)
    pos_id = tl.load(ids_ptr + pos) if HAS_IDS else pos
    s_pos, _, _ = _pair(q_ptr, qm_ptr, p_ptr, pm_ptr, b, pos, Lq, Lp, D, ACC, PRECISION, DOT_UPCAST,
                        BLOCK_Q, BLOCK_T, BLOCK_D)
    s_pos = s_pos * inv_t
    run_max = tl.full([], float("-inf"), ACC)
    run_sum = tl.zeros([], dtype=ACC)
    beaten = tl.zeros([], dtype=tl.int32)
    j0 = split * PER_PROGRAM
    for j in range(j0, tl.minimum(j0 + PER_PROGRAM, P)):
        s, _, _ = _pair(q_ptr, qm_ptr, p_ptr, pm_ptr, b, j, Lq, Lp, D, ACC, PRECISION, DOT_UPCAST,
                        BLOCK_Q, BLOCK_T, BLOCK_D)
        v = tl.where(_kept(j, pos, pos_id, ids_ptr, HAS_IDS), s * inv_t, float("-inf"))
        beaten += ((v > s_pos) & (j != pos)).to(tl.int32)
        new_max = tl.maximum(run_max, v)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing counted yet in this split
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(v - safe)
        run_max = new_max
    tl.store(spos_ptr + b, s_pos, mask=split == 0)
    tl.store(part_max_ptr + b * n_splits + split, run_max)
    tl.store(part_sum_ptr + b * n_splits + split, run_sum)
    tl.store(part_beaten_ptr + b * n_splits + split, beaten)


@triton.jit
def _dq_kernel(q_ptr, qm_ptr, p_ptr, pm_ptr, pos_ptr, ids_ptr, lse_ptr, scale_ptr, dq_ptr, P, Lq, Lp, D, inv_t,
               HAS_IDS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dq[b, :, d-chunk] = sum_j dS_bj p[j, t*(b, :, j), d-chunk] (a gather per passage)."""
    b = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    offs_i = tl.arange(0, BLOCK_Q)
    pos = tl.load(pos_ptr + b)
    pos_id = tl.load(ids_ptr + pos) if HAS_IDS else pos
    lse = tl.load(lse_ptr + b)
    scale = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_DO], dtype=ACC)
    for j in range(0, P):
        s, t_star, counted = _pair(q_ptr, qm_ptr, p_ptr, pm_ptr, b, j, Lq, Lp, D, ACC, PRECISION, DOT_UPCAST,
                                   BLOCK_Q, BLOCK_T, BLOCK_D)
        prob = tl.where(_kept(j, pos, pos_id, ids_ptr, HAS_IDS), tl.exp(s * inv_t - lse), 0.0)
        ds = (prob - (j == pos).to(ACC)) * scale
        pv = tl.load(p_ptr + (j * Lp + t_star)[:, None] * D + offs_o[None, :],
                     mask=counted[:, None] & o_ok[None, :], other=0.0)
        acc += ds * pv.to(ACC)
    tl.store(dq_ptr + (b * Lq + offs_i)[:, None] * D + offs_o[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=(offs_i < Lq)[:, None] & o_ok[None, :])


@triton.jit
def _dp_kernel(q_ptr, qm_ptr, p_ptr, pm_ptr, pos_ptr, ids_ptr, lse_ptr, scale_ptr, dp_ptr, B, Lq, Lp, D, inv_t,
               HAS_IDS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dp[j, t-chunk, d-chunk] = sum_b W_b^T q[b, :, d-chunk], W_b[i, t] = dS_bj [t == t*(b, i, j)]."""
    j = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    offs_i = tl.arange(0, BLOCK_Q)
    col_id = tl.load(ids_ptr + j) if HAS_IDS else j
    scale = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros([BLOCK_T, BLOCK_DO], dtype=ACC)
    for b in range(0, B):
        pos = tl.load(pos_ptr + b)
        lse = tl.load(lse_ptr + b)
        s, t_star, counted = _pair(q_ptr, qm_ptr, p_ptr, pm_ptr, b, j, Lq, Lp, D, ACC, PRECISION, DOT_UPCAST,
                                   BLOCK_Q, BLOCK_T, BLOCK_D)
        kept = j == pos
        if HAS_IDS:
            kept = kept | (col_id != tl.load(ids_ptr + pos))
        else:
            kept = True
        prob = tl.where(kept, tl.exp(s * inv_t - lse), 0.0)
        ds = (prob - (j == pos).to(ACC)) * scale
        w = tl.where(counted[:, None] & (t_star[:, None] == offs_t[None, :]), ds, 0.0)  # [BLOCK_Q, BLOCK_T]
        qv = tl.load(q_ptr + (b * Lq + offs_i)[:, None] * D + offs_o[None, :],
                     mask=(offs_i < Lq)[:, None] & o_ok[None, :], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(tl.trans(w), qv.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(w.to(qv.dtype)), qv, acc, input_precision=PRECISION)
    tl.store(dp_ptr + (j * Lp + offs_t)[:, None] * D + offs_o[None, :], acc.to(dp_ptr.dtype.element_ty),
             mask=(offs_t < Lp)[:, None] & o_ok[None, :])


def _blocks(Lq, Lp, D, device):
    """(BLOCK_Q, BLOCK_T, BLOCK_D, BLOCK_DO, passages per forward program, num_warps). tl.dot on a
    GPU wants every block dimension >= 16; the interpreter prefers few, large programs."""
    bq = max(16, triton.next_power_of_2(Lq))
    d_pow2 = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":
        return bq, max(16, min(triton.next_power_of_2(Lp), 64)), min(d_pow2, 64), min(d_pow2, 64), 64, 4
    bt = max(16, min(triton.next_power_of_2(Lp), 128, 8192 // bq))
    return bq, bt, min(d_pow2, 64), min(d_pow2, 128), 16, 4


def _launch_args(q, Lq, Lp, D):
    bq, bt, bd, bdo, per_program, warps = _blocks(Lq, Lp, D, q.device)
    return dict(ACC=acc_type(q.dtype), PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q), BLOCK_Q=bq,
                BLOCK_T=bt, BLOCK_D=bd, num_warps=warps), bdo, per_program


def scores(q_tok, q_mask, p_tok, p_mask):
    """-> S [B, P] in the accumulation dtype."""
    B, Lq, D = q_tok.shape
    P, Lp = p_tok.shape[:2]
    common, _, per_program = _launch_args(q_tok, Lq, Lp, D)
    out = torch.empty(B, P, device=q_tok.device, dtype=torch.float64 if q_tok.dtype == torch.float64 else torch.float32)
    _scores_kernel[(B, triton.cdiv(P, per_program))](q_tok, q_mask, p_tok, p_mask, out, P, Lq, Lp, D, per_program,
                                                      **common)
    return out


def forward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, temperature):
    """-> (lse [B], row_loss [B], ranks [B] int64); lse and row_loss in the accumulation dtype."""
    B, Lq, D = q_tok.shape
    P, Lp = p_tok.shape[:2]
    common, _, per_program = _launch_args(q_tok, Lq, Lp, D)
    acc_dtype = torch.float64 if q_tok.dtype == torch.float64 else torch.float32
    splits = triton.cdiv(P, per_program)
    s_pos = torch.empty(B, device=q_tok.device, dtype=acc_dtype)
    part_max = torch.empty(B, splits, device=q_tok.device, dtype=acc_dtype)
    part_sum = torch.empty_like(part_max)
    part_beaten = torch.empty(B, splits, device=q_tok.device, dtype=torch.int32)
    has_ids = passage_ids is not None
    _forward_kernel[(B, splits)](
        q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids if has_ids else positive_index, s_pos, part_max,
        part_sum, part_beaten, P, Lq, Lp, D, 1.0 / temperature, per_program, HAS_IDS=has_ids, **common)
    # Fold the splits: the positive's split has a finite max, so m is finite.
    m = part_max.max(1).values
    lse = m + torch.log((part_sum * torch.exp(part_max - m[:, None])).sum(1))
    return lse, lse - s_pos, 1 + part_beaten.sum(1).to(torch.int64)


def backward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse, scale, temperature, need_q, need_p):
    """-> (dq or None, dp or None) in the input dtype; scale = g / (B T), a 0-dim tensor on the
    device (read by the kernels, so no host sync)."""
    B, Lq, D = q_tok.shape
    P, Lp = p_tok.shape[:2]
    common, bdo, _ = _launch_args(q_tok, Lq, Lp, D)
    has_ids = passage_ids is not None
    ids = passage_ids if has_ids else positive_index
    scale = scale.to(device=q_tok.device, dtype=lse.dtype).reshape(1)
    grad_dtype = lse.dtype if dot_upcast(q_tok) else q_tok.dtype
    args = (q_tok, q_mask, p_tok, p_mask, positive_index, ids, lse, scale)
    dq = dp = None
    if need_q:
        dq = torch.empty(q_tok.shape, device=q_tok.device, dtype=grad_dtype)
        _dq_kernel[(B, triton.cdiv(D, bdo))](*args, dq, P, Lq, Lp, D, 1.0 / temperature, HAS_IDS=has_ids,
                                              BLOCK_DO=bdo, **common)
    if need_p:
        dp = torch.empty(p_tok.shape, device=p_tok.device, dtype=grad_dtype)
        _dp_kernel[(P, triton.cdiv(Lp, common["BLOCK_T"]), triton.cdiv(D, bdo))](
            *args, dp, B, Lq, Lp, D, 1.0 / temperature, HAS_IDS=has_ids, BLOCK_DO=bdo, **common)
    if grad_dtype != q_tok.dtype:
        dq = None if dq is None else dq.to(q_tok.dtype)
        dp = None if dp is None else dp.to(p_tok.dtype)
    return dq, dp

"""Triton kernels for lora_linear (maths: embedcore/ops/lora_linear.py; the dropout
hash: embedcore/ops/dropout_hash.py).

Forward, one kernel: each program owns an [BLOCK_M, BLOCK_N] output tile and, in the same loop
over `in`, accumulates both x W^T and its M-block's rank-r intermediate xa = (mask * x) A^T
(r is small, it stays in registers; recomputed once per N-block, a cost of r / BLOCK_N of the
main product), then adds s' xa B^T and the bias. xa never reaches global memory.

Backward (s' = scaling / (1 - p), g = s' dy B):
    dx = dy W + mask * (g A)      dA = g^T (mask * x)      dB = s' dy^T xa
  1. _rank_kernel: per M-block, xa = (mask * x) A^T and g = s' dy B   -> two [M, r] fp32 buffers
  2. _dx_kernel: per (M, in) tile, dy W accumulated over `out`, plus mask * (g A)
  3. _rank_reduce_kernel (twice): dB^T-style reductions over M: out[l, :] = sum_m big[m, l] rank[m, :]
Nothing larger than the [M, r] intermediates is written besides the gradients themselves, and
there is no gradient for W or b.

Limits: r up to 128 (padded to a power of two >= 16 for tl.dot); fp32 inputs use IEEE fp32 dots
(no TF32) so results match the fp32 reference; dropout needs M * in < 2^32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from embedcore.backends import triton_interpreted
from embedcore.kernels._common import dot_precision, dot_upcast
from embedcore.ops.dropout_hash import MIX_C1, MIX_C2, kernel_mask_args

# The mixer's constants as Triton sees a global: a constexpr, the one definition in dropout_hash.
_MIX_C1 = tl.constexpr(MIX_C1)
_MIX_C2 = tl.constexpr(MIX_C2)


@triton.jit
def _mix32(h):
    # embedcore.ops.dropout_hash.mix32 in native uint32 (wraps mod 2^32, so no & MASK32).
    h = h ^ (h >> 16)
    h = h * _MIX_C1
    h = h ^ (h >> 15)
    h = h * _MIX_C2
    h = h ^ (h >> 15)
    return h


@triton.jit
def _keep(offs_m, offs_k, K, k1, k2, thr):
    """Keep-mask [len(offs_m), len(offs_k)] of elements (m, k) of the flattened x [M, K]."""
    idx = (offs_m[:, None].to(tl.int64) * K + offs_k[None, :]).to(tl.uint32)
    h = _mix32(_mix32(idx ^ k1.to(tl.uint32)) ^ k2.to(tl.uint32))
    return (h >> 8) >= thr.to(tl.uint32)


@triton.jit(do_not_specialize=["k1", "k2", "thr"])
def _fwd_kernel(x_ptr, w_ptr, b_ptr, a_ptr, bb_ptr, out_ptr, M, N, K, R, s_eff, k1, k2, thr,
                HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x, wt, at = x.to(tl.float32), wt.to(tl.float32), at.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
        if DROPOUT:
            x = tl.where(_keep(offs_m, offs_k, K, k1, k2, thr), x, tl.zeros_like(x))
        xa = tl.dot(x, at, xa, input_precision=PRECISION)
    bt = tl.load(bb_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
    acc += s_eff * tl.dot(xa, bt.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["k1", "k2", "thr"])
def _rank_kernel(x_ptr, dy_ptr, a_ptr, bb_ptr, xa_ptr, g_ptr, M, N, K, R, s_eff, k1, k2, thr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # xa = (mask * x) A^T and g = s' dy B for one M-block, both [BLOCK_M, r] fp32.
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep(offs_m, offs_k, K, k1, k2, thr), x, tl.zeros_like(x))
        at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x, at = x.to(tl.float32), at.to(tl.float32)
        xa = tl.dot(x, at, xa, input_precision=PRECISION)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(bb_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            dy, b = dy.to(tl.float32), b.to(tl.float32)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
    out_mask = m_ok[:, None] & r_ok[None, :]
    tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=out_mask)
    tl.store(g_ptr + offs_m[:, None] * R + offs_r[None, :], g * s_eff, mask=out_mask)


@triton.jit(do_not_specialize=["k1", "k2", "thr"])
def _dx_kernel(dy_ptr, w_ptr, a_ptr, g_ptr, dx_ptr, M, N, K, R, k1, k2, thr,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # dx tile = dy W (over all of `out`) + mask * (g A).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    g = tl.load(g_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    lora = tl.dot(g, a.to(tl.float32), input_precision="ieee")
    if DROPOUT:
        lora = tl.where(_keep(offs_m, offs_k, K, k1, k2, thr), lora, tl.zeros_like(lora))
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], (acc + lora).to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["k1", "k2", "thr"])
def _rank_reduce_kernel(big_ptr, rank_ptr, out_ptr, M, L, R, scale, k1, k2, thr,
                        DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    # out[l, :] = scale * sum_m keep(m, l) big[m, l] rank[m, :]  for one L-block; big [M, L], rank [M, r] fp32.
    pid_l = tl.program_id(0)
    offs_l = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    l_ok = offs_l < L
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < M
        big = tl.load(big_ptr + offs_m[:, None] * L + offs_l[None, :], mask=m_ok[:, None] & l_ok[None, :], other=0.0)
        if DROPOUT:
            big = tl.where(_keep(offs_m, offs_l, L, k1, k2, thr), big, tl.zeros_like(big))
        rank = tl.load(rank_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(big.to(tl.float32)), rank, acc, input_precision="ieee")
    tl.store(out_ptr + offs_l[:, None] * R + offs_r[None, :], acc * scale, mask=l_ok[:, None] & r_ok[None, :])


def _blocks(r: int) -> dict:
    block_r = max(16, triton.next_power_of_2(r))
    if triton_interpreted():  # the interpreter's cost grows with tile size; keep tiles small
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_R=block_r)
    return dict(BLOCK_M=64, BLOCK_N=128 if block_r <= 64 else 64, BLOCK_K=32, BLOCK_R=block_r, num_warps=8, num_stages=3)


def _out_buffer(shape, like):
    return torch.empty(shape, device=like.device, dtype=torch.float32 if dot_upcast(like) else like.dtype)


def forward(x, weight, bias, lora_a, lora_b, s_eff, dropout_p, seed):
    """-> (out [M, out] in x's dtype, None): xa is recomputed in backward, never stored."""
    if x.dtype == torch.float64:
        raise ValueError("lora_linear: the triton backend supports fp32/bf16/fp16, not fp64 (use backend='torch' or 'cpp')")
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    if R > 128:
        raise ValueError(f"lora_linear: the triton backend supports rank r <= 128, got {R}")
    dropout, k1, k2, thr = kernel_mask_args(dropout_p, seed)
    out = _out_buffer((M, N), x)
    blk = _blocks(R)
    grid = (triton.cdiv(M, blk["BLOCK_M"]), triton.cdiv(N, blk["BLOCK_N"]))
    _fwd_kernel[grid](x, weight, bias if bias is not None else x, lora_a, lora_b, out, M, N, K, R, s_eff, k1, k2, thr,
                      HAS_BIAS=bias is not None, DROPOUT=dropout, PRECISION=dot_precision(x.dtype), UPCAST=dot_upcast(x), **blk)
    return out.to(x.dtype), None


def backward(grad_out, x, weight, lora_a, lora_b, xa, s_eff, dropout_p, seed, need_dx):
    """-> (dx or None, dA, dB) in x's dtype."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dropout, k1, k2, thr = kernel_mask_args(dropout_p, seed)
    blk = _blocks(R)
    prec = dot_precision(x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=torch.float32)
    g = torch.empty((M, R), device=x.device, dtype=torch.float32)
    _rank_kernel[(triton.cdiv(M, blk["BLOCK_M"]),)](x, grad_out, lora_a, lora_b, xa, g, M, N, K, R, s_eff, k1, k2, thr,
                                                    DROPOUT=dropout, PRECISION=prec, UPCAST=dot_upcast(x), **blk)
    dx = None
    if need_dx:
        dx = _out_buffer((M, K), x)
        grid = (triton.cdiv(M, blk["BLOCK_M"]), triton.cdiv(K, blk["BLOCK_K"]))
        _dx_kernel[grid](grad_out, weight, lora_a, g, dx, M, N, K, R, k1, k2, thr, DROPOUT=dropout, PRECISION=prec, UPCAST=dot_upcast(x), **blk)
        dx = dx.to(x.dtype)
    red = dict(BLOCK_M=blk["BLOCK_M"] if triton_interpreted() else 32, BLOCK_L=blk["BLOCK_N"] if triton_interpreted() else 64,
               BLOCK_R=blk["BLOCK_R"])
    if not triton_interpreted():
        red["num_warps"] = 4
    db = torch.empty((N, R), device=x.device, dtype=torch.float32)
    _rank_reduce_kernel[(triton.cdiv(N, red["BLOCK_L"]),)](grad_out, xa, db, M, N, R, s_eff, 0, 0, 0, DROPOUT=False, **red)
    da_t = torch.empty((K, R), device=x.device, dtype=torch.float32)
    _rank_reduce_kernel[(triton.cdiv(K, red["BLOCK_L"]),)](x, g, da_t, M, K, R, 1.0, k1, k2, thr, DROPOUT=dropout, **red)
    return dx, da_t.t().to(x.dtype).contiguous(), db.to(x.dtype)

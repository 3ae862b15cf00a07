"""Triton kernels for pool_l2 (see embedcore/ops/pool_l2.py for the maths and the reference).

Pooled modes run as two launches: a weighted reduction over the sequence, split over
(row, D-block) programs so that small batches still fill the GPU, writing the fp32 pre-norm
vector (kept for backward, B x D only), then a row-wise normalise-and-cast. The B x S x D
product h * w is never materialised, and masked loads skip padded tokens (weight 0).

Backward, with x the pre-norm vector, n = max(|x|, eps), y = x / n:
    dx = (dy - y <y, dy>) / |x|   if |x| > eps,   dy / eps otherwise
    dh[b, s] = w[b, s] * dx[b]
colbert: the same normalisation per token, padded tokens zero.

Limits: accumulation is fp32 (fp64 for fp64 inputs); D of any size (looped in BLOCK_D chunks).
"""
import torch
import triton
import triton.language as tl

from embedcore.kernels._common import acc_type


@triton.jit
def _weighted_sum_kernel(h_ptr, w_ptr, pooled_ptr, S, D, stride_hb, stride_hs,
                         ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        w = tl.load(w_ptr + b * S + offs_s, mask=offs_s < S, other=0.0)
        ptrs = h_ptr + b * stride_hb + offs_s[:, None] * stride_hs + offs_d[None, :]
        h = tl.load(ptrs, mask=(w != 0)[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * h, axis=0)
    tl.store(pooled_ptr + b * D + offs_d, acc, mask=d_ok)


@triton.jit
def _normalize_rows_kernel(x_ptr, m_ptr, out_ptr, D, eps, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
                           ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = m[r] * x[r] / max(|x[r]|, eps), cast to out's dtype (m = 1 without a mask)."""
    r = tl.program_id(0)
    scale = tl.full([1], 1.0, ACC)
    if NORMALIZE:
        sq = tl.zeros([BLOCK_D], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + r * D + offs, mask=offs < D, other=0.0).to(ACC)
            sq += x * x
        scale = scale / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
    if HAS_MASK:
        scale = scale * tl.load(m_ptr + r + tl.arange(0, 1)).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + r * D + offs, mask=offs < D, other=0.0).to(ACC)
        tl.store(out_ptr + r * D + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _normalize_rows_backward_kernel(x_ptr, dy_ptr, m_ptr, dx_ptr, D, eps, NORMALIZE: tl.constexpr,
                                    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx[r] for out[r] = m[r] * x[r] / max(|x[r]|, eps); x is recomputed from, not saved as, y."""
    r = tl.program_id(0)
    m = tl.full([1], 1.0, ACC)
    if HAS_MASK:
        m = tl.load(m_ptr + r + tl.arange(0, 1)).to(ACC)
    sq = tl.zeros([BLOCK_D], dtype=ACC)
    xdy = tl.zeros([BLOCK_D], dtype=ACC)
    if NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + r * D + offs, mask=offs < D, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + r * D + offs, mask=offs < D, other=0.0).to(ACC)
            sq += x * x
            xdy += x * dy
    norm = tl.sqrt(tl.sum(sq, axis=0))
    big = norm > eps
    inv = 1.0 / tl.maximum(norm, eps)
    # <y, dy> = <x, dy> / |x|; the projection term only applies where the norm is not clamped.
    ydy = tl.where(big, tl.sum(xdy, axis=0) * inv, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        dy = tl.load(dy_ptr + r * D + offs, mask=offs < D, other=0.0).to(ACC)
        if NORMALIZE:
            x = tl.load(x_ptr + r * D + offs, mask=offs < D, other=0.0).to(ACC)
            dx = (dy - x * inv * ydy) * inv
        else:
            dx = dy
        tl.store(dx_ptr + r * D + offs, (dx * m).to(dx_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _outer_kernel(w_ptr, g_ptr, out_ptr, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, s, :] = w[b, s] * g[b, :]."""
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + b * S + offs_s, mask=offs_s < S, other=0.0)
    g = tl.load(g_ptr + b * D + offs_d, mask=offs_d < D, other=0.0)
    out = (w[:, None] * g[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * S * D + offs_s[:, None] * D + offs_d[None, :], out,
             mask=(offs_s < S)[:, None] & (offs_d < D)[None, :])


def _block_d(D):
    return min(triton.next_power_of_2(D), 1024)


def forward(hidden, weights, normalize, eps):
    B, S, D = hidden.shape
    pooled = torch.empty((B, D), device=hidden.device, dtype=weights.dtype)
    out = torch.empty((B, D), device=hidden.device, dtype=hidden.dtype)
    block_d = min(triton.next_power_of_2(D), 128)
    _weighted_sum_kernel[(B, triton.cdiv(D, block_d))](
        hidden, weights, pooled, S, D, hidden.stride(0), hidden.stride(1),
        ACC=acc_type(hidden.dtype), BLOCK_S=16, BLOCK_D=block_d)
    _normalize_rows_kernel[(B,)](pooled, pooled, out, D, eps, NORMALIZE=normalize, HAS_MASK=False,
                                 ACC=acc_type(hidden.dtype), BLOCK_D=_block_d(D))
    return out, pooled


def backward(grad_out, weights, pooled, normalize, eps, shape, dtype):
    B, S, D = shape
    dpooled = torch.empty_like(pooled)
    acc = acc_type(dtype)
    _normalize_rows_backward_kernel[(B,)](pooled, grad_out, pooled, dpooled, D, eps, NORMALIZE=normalize,
                                          HAS_MASK=False, ACC=acc, BLOCK_D=_block_d(D))
    grad = torch.empty((B, S, D), device=pooled.device, dtype=dtype)
    block_d = min(triton.next_power_of_2(D), 128)
    _outer_kernel[(B, triton.cdiv(S, 16), triton.cdiv(D, block_d))](weights, dpooled, grad, S, D,
                                                                    BLOCK_S=16, BLOCK_D=block_d)
    return grad


def colbert_forward(hidden, token_mask, normalize, eps):
    B, S, D = hidden.shape
    out = torch.empty_like(hidden)
    _normalize_rows_kernel[(B * S,)](hidden, token_mask, out, D, eps, NORMALIZE=normalize, HAS_MASK=True,
                                     ACC=acc_type(hidden.dtype), BLOCK_D=_block_d(D))
    return out


def colbert_backward(grad_out, hidden, token_mask, normalize, eps):
    B, S, D = hidden.shape
    grad = torch.empty_like(hidden)
    _normalize_rows_backward_kernel[(B * S,)](hidden, grad_out, token_mask, grad, D, eps, NORMALIZE=normalize,
                                              HAS_MASK=True, ACC=acc_type(hidden.dtype), BLOCK_D=_block_d(D))
    return grad

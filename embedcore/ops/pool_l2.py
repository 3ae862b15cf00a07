"""pool_l2: masked pooling fused with L2 normalisation.

Every non-colbert mode is a weighted sum over the sequence, pooled[b] = sum_s w[b, s] h[b, s],
with weights derived from the mask alone (cheap, [B, S]):

    avg            w = m / n                      n = number of real tokens
    weighted_avg   w = m * k / (n (n + 1) / 2)    k = 1..n, the position among real tokens
    cls            one-hot at the first real token
    last           one-hot at the last real token

so a backend only implements "weighted sum + L2 norm" (and its backward,
dh[b, s] = w[b, s] * dpooled[b]), and `colbert` (each real token normalised, padding zeroed).
A row without real tokens has all-zero weights, hence a zero output (F.normalize clamps the
norm at eps, so 0 / eps = 0, never NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from embedcore import backends

MODES = ("avg", "weighted_avg", "cls", "last", "colbert")

# The C++ and Triton launch modules, one protocol. Pooled modes: forward(hidden, weights, normalize,
# eps) -> (out, pre-norm pooled [B, D]); backward(grad_out, weights, pooled, normalize, eps, shape,
# dtype) -> d hidden. colbert: colbert_forward(hidden, token_mask, normalize, eps) -> out;
# colbert_backward(grad_out, hidden, token_mask, normalize, eps) -> d hidden.
IMPLEMENTATIONS = backends.Implementations(
    op="pool_l2", cpp="embedcore.ops._pool_l2_cpp", triton="embedcore.kernels.pool_l2",
    protocol=("forward", "backward", "colbert_forward", "colbert_backward"))


def pooling_weights(attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, S] weights (fp32) whose weighted sum over the sequence is the pooled vector."""
    m = attention_mask.to(torch.float32) if attention_mask.dtype != torch.float64 else attention_mask.double()
    m = (m != 0).to(m.dtype)
    if mode == "avg":
        return m / m.sum(1, keepdim=True).clamp_min(1)
    if mode == "weighted_avg":
        k = torch.cumsum(m, 1) * m
        return k / k.sum(1, keepdim=True).clamp_min(1)
    if mode in ("cls", "last"):
        positions = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)
        has_token = m.sum(1) > 0
        if mode == "cls":  # smallest real position: push padding past the end
            idx = torch.where(m > 0, positions, torch.full_like(positions, m.shape[1])).argmin(1)
        else:
            idx = torch.where(m > 0, positions, torch.full_like(positions, -1)).argmax(1)
        w = torch.zeros_like(m)
        w[torch.arange(m.shape[0], device=m.device), idx] = 1.0
        return w * has_token[:, None].to(m.dtype)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {MODES}")


def pool_l2_reference(hidden, attention_mask, mode="avg", normalize=True, eps=1e-12):
    """The readable specification (plain torch, differentiable, fp32 accumulation)."""
    acc = backends.accumulation_dtype(hidden.dtype)
    h = hidden.to(acc)
    m = (attention_mask != 0).to(acc)
    if mode == "colbert":
        out = F.normalize(h, dim=-1, eps=eps) if normalize else h
        return (out * m[..., None]).to(hidden.dtype)
    w = pooling_weights(attention_mask, mode).to(acc)
    pooled = torch.einsum("bs,bsd->bd", w, h)
    if normalize:
        pooled = F.normalize(pooled, dim=-1, eps=eps)
    return pooled.to(hidden.dtype)


def _check(hidden, attention_mask, mode, eps):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"pool_l2: hidden must be a [B, S, D] tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"pool_l2: attention_mask must be a [B, S] tensor, got shape {tuple(getattr(attention_mask, 'shape', ()))}")
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"pool_l2: attention_mask shape {tuple(attention_mask.shape)} does not match hidden [B, S] = {tuple(hidden.shape[:2])}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"pool_l2: attention_mask must be 0/1 of an integer or bool dtype, got {attention_mask.dtype}")
    if not hidden.is_floating_point():
        raise ValueError(f"pool_l2: hidden must be floating point, got {hidden.dtype}")
    if mode not in MODES:
        raise ValueError(f"pool_l2: unknown mode {mode!r}; expected one of {MODES}")
    if not eps > 0:
        raise ValueError(f"pool_l2: eps must be > 0, got {eps}")


class PoolL2Function(torch.autograd.Function):
    """The one autograd.Function of pool_l2, for every non-torch backend.

    Pooled modes: `weights` are the [B, S] pooling weights; the backend returns the output and
    the fp32 pre-norm vector [B, D], which backward reuses (hidden is not kept).
    colbert: `weights` is the [B, S] 0/1 token mask; backward recomputes the token norms from
    hidden, which is kept instead.
    """

    @staticmethod
    def forward(ctx, hidden, weights, normalize, eps, colbert, backend):
        ctx.launch = IMPLEMENTATIONS.launch(backend)
        ctx.normalize, ctx.eps, ctx.colbert = normalize, eps, colbert
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        if colbert:
            ctx.save_for_backward(hidden, weights)
            return ctx.launch.colbert_forward(hidden, weights, normalize, eps)
        out, pooled = ctx.launch.forward(hidden, weights, normalize, eps)
        ctx.save_for_backward(weights, pooled)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        if ctx.colbert:
            hidden, token_mask = ctx.saved_tensors
            grad = ctx.launch.colbert_backward(grad_out, hidden, token_mask, ctx.normalize, ctx.eps)
        else:
            weights, pooled = ctx.saved_tensors
            grad = ctx.launch.backward(grad_out, weights, pooled, ctx.normalize, ctx.eps, ctx.hidden_shape,
                                       ctx.hidden_dtype)
        return grad, None, None, None, None, None


def pool_l2(hidden, attention_mask, mode="avg", normalize=True, eps=1e-12, backend=None):
    """Masked pooling + L2 normalisation.

    hidden [B, S, D] (fp32/bf16/fp16/fp64), attention_mask [B, S] (0/1, integer or bool; any
    padding side, mixed in one batch). Returns [B, D] in hidden's dtype, or [B, S, D] for
    `colbert`. A row with no real token gives zeros.
    """
    _check(hidden, attention_mask, mode, eps)
    name = backends.resolve(backend, hidden)
    if name == "torch":
        return pool_l2_reference(hidden, attention_mask, mode, normalize, eps)
    hidden = hidden.contiguous()
    if mode == "colbert":
        weights = (attention_mask != 0).to(backends.accumulation_dtype(hidden.dtype))
    else:
        weights = pooling_weights(attention_mask, mode).to(backends.accumulation_dtype(hidden.dtype))
    return PoolL2Function.apply(hidden, weights.contiguous(), normalize, eps, mode == "colbert", name)

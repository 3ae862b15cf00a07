"""lora_linear: a frozen linear layer plus a LoRA update, fused.

    y = x W^T + b + scaling * dropout(x) A^T B^T

with PEFT's shapes: W [out, in] and b [out] frozen (never get a gradient), A [r, in], B [out, r],
scaling = alpha / r, x [..., in] with any number of leading dims. Dropout acts on the LoRA input
only (PEFT semantics).

Dropout mask: counter based, so every backend regenerates the same mask from (seed, element
index) instead of storing it; the hash lives in embedcore/ops/dropout_hash.py (see `keep_mask`).
The kept values are scaled by 1 / (1 - p). Backends apply the mask as a plain zeroing and fold
1 / (1 - p) into the scaling, which is exact in any dtype:

    s' = scaling / (1 - p),  xa = (mask * x) A^T  [M, r]
    y  = x W^T + b + s' xa B^T
    backward, with dy [M, out] and g = s' dy B [M, r]:
      dx = dy W + mask * (g A)      dA = g^T (mask * x)      dB = s' dy^T xa

so nothing larger than the rank-r intermediates xa and g exists besides the inputs and outputs.
"""
from __future__ import annotations

import torch

from embedcore import backends
from embedcore.ops.dropout_hash import MAX_DROPOUT_ELEMENTS, keep_mask

# The C++ and Triton launch modules, one protocol: forward(x2d, weight, bias, lora_a, lora_b, s_eff,
# dropout_p, seed) -> (out, xa or None); backward(grad_out, x2d, weight, lora_a, lora_b, xa, s_eff,
# dropout_p, seed, need_dx) -> (dx or None, dA, dB).
IMPLEMENTATIONS = backends.Implementations(
    op="lora_linear", cpp="embedcore.ops._lora_linear_cpp", triton="embedcore.kernels.lora_linear")


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    """The readable specification: plain torch, fp32 (fp64 for fp64) accumulation, returns x's dtype."""
    acc = backends.accumulation_dtype(x.dtype)
    xf = x.to(acc)
    out = xf @ weight.detach().to(acc).T
    if bias is not None:
        out = out + bias.detach().to(acc)
    h = xf
    if dropout_p > 0:
        mask = keep_mask(seed, dropout_p, xf.numel() // xf.shape[-1], xf.shape[-1], device=x.device)
        h = xf * mask.view(xf.shape).to(acc) / (1.0 - dropout_p)
    out = out + scaling * ((h @ lora_a.to(acc).T) @ lora_b.to(acc).T)
    return out.to(x.dtype)


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _check(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"lora_linear: {name} must be floating point, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension [..., in]")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be [out, in], got shape {_shape(weight)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x [..., in] has in={x.shape[-1]} but weight [out, in] = {_shape(weight)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_linear: lora_a must be [r, in] with in={in_f}, got shape {_shape(lora_a)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError("lora_linear: lora_a must have rank r >= 1")
    if _shape(lora_b) != (out_f, r):
        raise ValueError(f"lora_linear: lora_b must be [out, r] = [{out_f}, {r}], got shape {_shape(lora_b)}")
    if bias is not None and _shape(bias) != (out_f,):
        raise ValueError(f"lora_linear: bias must be [out] = [{out_f}] or None, got shape {_shape(bias)}")
    tensors = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; all must share one dtype")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"lora_linear: {name} is frozen by contract (it never gets a gradient); "
                                 f"call {name}.requires_grad_(False) first")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(scaling, (int, float)):
        raise TypeError(f"lora_linear: scaling must be a Python number, got {type(scaling).__name__}")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"lora_linear: seed must be an int or None, got {type(seed).__name__}")


class LoRALinearFunction(torch.autograd.Function):
    """Gradients for x, A and B only. The backend's forward may hand back the rank-r
    intermediate xa to keep (cpp) or None (triton recomputes it in backward)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
        ctx.launch = IMPLEMENTATIONS.launch(backend)
        ctx.s_eff = scaling / (1.0 - dropout_p)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        out, xa = ctx.launch.forward(x2d, weight, bias, lora_a, lora_b, ctx.s_eff, dropout_p, seed)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, xa)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, da, db = ctx.launch.backward(grad_out.contiguous(), x2d, weight, lora_a, lora_b, xa, ctx.s_eff,
                                         ctx.dropout_p, ctx.seed, need_dx)
        return dx, None, None, da, db, None, None, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None, backend=None):
    """y = x W^T + b + scaling * dropout(x) A^T B^T (PEFT shapes: W [out, in], A [r, in], B [out, r]).

    x [..., in]; every tensor of one dtype (fp32, bf16, fp16, fp64) and device. W and b are frozen
    (requires_grad must be False); gradients flow to x, A and B. With dropout_p > 0 the mask is
    reproducible from `seed` (see `keep_mask`); seed=None draws one from torch's default
    generator, so `torch.manual_seed` makes runs repeatable. Returns [..., out] in x's dtype.
    """
    _check(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    dropout_p = float(dropout_p)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    name = backends.resolve(backend, x)
    if name == "torch":
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, float(scaling), dropout_p, seed)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    if dropout_p > 0 and x2d.numel() > MAX_DROPOUT_ELEMENTS:
        raise ValueError(f"lora_linear: dropout supports at most 2^32 input elements per call, got {x2d.numel()}")
    out = LoRALinearFunction.apply(
        x2d, weight.detach().contiguous(), None if bias is None else bias.detach().contiguous(),
        lora_a.contiguous(), lora_b.contiguous(), float(scaling), dropout_p, seed if dropout_p > 0 else 0, name,
    )
    return out.view(*lead, weight.shape[0])

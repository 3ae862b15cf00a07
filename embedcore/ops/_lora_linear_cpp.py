"""Launch helpers for the C++ lora_linear kernels (csrc/lora_linear.cpp).

`s_eff` is scaling / (1 - p); the dropout mask is passed as its hash keys and threshold
(embedcore/ops/dropout_hash.py), so C++ regenerates exactly the mask the reference builds.
"""
from embedcore.backends import cpp_ops
from embedcore.ops.dropout_hash import kernel_mask_args


def forward(x, weight, bias, lora_a, lora_b, s_eff, dropout_p, seed):
    """-> (out [M, out] in x's dtype, xa [M, r] fp32/fp64, kept for backward)."""
    out, xa = cpp_ops().lora_linear_forward(x, weight, bias, lora_a, lora_b, s_eff,
                                            *kernel_mask_args(dropout_p, seed))
    return out, xa


def backward(grad_out, x, weight, lora_a, lora_b, xa, s_eff, dropout_p, seed, need_dx):
    """-> (dx or None, dA, dB)."""
    dx, da, db = cpp_ops().lora_linear_backward(grad_out, x, weight, lora_a, lora_b, xa, s_eff,
                                                *kernel_mask_args(dropout_p, seed), need_dx)
    return (dx if need_dx else None), da, db

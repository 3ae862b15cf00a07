"""Launch helpers for the C++ pool_l2 kernels (csrc/pool_l2.cpp)."""
from embedcore.backends import cpp_ops


def forward(hidden, weights, normalize, eps):
    return tuple(cpp_ops().pool_l2_forward(hidden, weights, normalize, eps))


def backward(grad_out, weights, pooled, normalize, eps, shape, dtype):
    return cpp_ops().pool_l2_backward(grad_out, weights, pooled, normalize, eps, shape[1], dtype)


def colbert_forward(hidden, token_mask, normalize, eps):
    return cpp_ops().colbert_l2_forward(hidden, token_mask, normalize, eps)


def colbert_backward(grad_out, hidden, token_mask, normalize, eps):
    return cpp_ops().colbert_l2_backward(grad_out, hidden, token_mask, normalize, eps)

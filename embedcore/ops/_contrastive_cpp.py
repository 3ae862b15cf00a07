"""Launch helpers for the C++ contrastive_loss kernels (csrc/contrastive.cpp)."""
from embedcore.backends import cpp_ops


def forward(q, p, positive_index, passage_ids, temperature):
    """-> (lse [B], row_loss [B], ranks [B] int64); lse and row_loss in the accumulation dtype."""
    return tuple(cpp_ops().contrastive_forward(q, p, positive_index, passage_ids, 1.0 / temperature))


def backward(q, p, positive_index, passage_ids, lse, scale, temperature, need_q, need_p):
    """-> (dq or None, dp or None); scale = g / (B * temperature) as a 0-dim tensor."""
    dq, dp = cpp_ops().contrastive_backward(
        q, p, positive_index, passage_ids, lse, float(scale), 1.0 / temperature, need_q, need_p
    )
    return (dq if need_q else None), (dp if need_p else None)

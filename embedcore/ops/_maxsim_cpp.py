"""Launch helpers for the C++ maxsim kernels (csrc/maxsim.cpp). Inputs: contiguous token
tensors, bool masks, int64 positive_index / passage_ids (see embedcore.ops.maxsim)."""
from embedcore.backends import cpp_ops


def scores(q_tok, q_mask, p_tok, p_mask):
    """-> S [B, P] in the accumulation dtype."""
    return cpp_ops().maxsim_scores(q_tok, q_mask, p_tok, p_mask)


def forward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, temperature):
    """-> (lse [B], row_loss [B], ranks [B] int64); lse and row_loss in the accumulation dtype."""
    return tuple(cpp_ops().maxsim_forward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids,
                                          1.0 / temperature))


def backward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse, scale, temperature, need_q, need_p):
    """-> (dq or None, dp or None) in the input dtype; scale = g / (B * temperature), a 0-dim tensor."""
    dq, dp = cpp_ops().maxsim_backward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse, float(scale),
                                       1.0 / temperature, need_q, need_p)
    return (dq if need_q else None), (dp if need_p else None)

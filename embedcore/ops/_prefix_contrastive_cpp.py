"""Launch helpers for the C++ prefix_contrastive kernels (csrc/prefix_contrastive.cpp)."""
from embedcore.backends import cpp_ops


def forward(q, p, alpha, beta, positive_index, passage_ids, dims, margin, delta):
    """-> (lse [B, K], s_pos [B, K], ranks [B, K] int64, masked [B, K] int64)."""
    return tuple(cpp_ops().prefix_contrastive_forward(q, p, alpha, beta, positive_index, passage_ids, list(dims),
                                                      margin, delta))


def backward(q, p, alpha, beta, positive_index, passage_ids, lse, s_pos, coef, dims, margin, delta,
                    need_q, need_p, need_alpha, need_beta, acc_grads=False):
    """-> (dq, dp, sum_j dS s [B, K], sum_i dS s [P, K]), each None when not needed; coef [K] = g w / B.
    dq, dp in the input dtype, or in the accumulation dtype with acc_grads (the kernel's own)."""
    dq, dp, row, col = cpp_ops().prefix_contrastive_backward(
        q, p, alpha, beta, positive_index, passage_ids, lse, s_pos, coef.contiguous(), list(dims), margin, delta,
        need_q, need_p, need_alpha, need_beta)
    if not acc_grads:
        dq, dp = dq.to(q.dtype), dp.to(p.dtype)
    return (dq if need_q else None, dp if need_p else None, row if need_alpha else None, col if need_beta else None)

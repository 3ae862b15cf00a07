"""contrastive_loss: InfoNCE over B queries and P passages, computed tile by tile.

With s = q p^T / temperature ([B, P], never materialised by the cpp and triton backends),
pos(i) the positive column of query i and E(i) the columns excluded from query i's
denominator (passages whose id equals the id of pos(i), other than pos(i) itself):

    loss   = mean_i [ lse_i - s_i,pos(i) ],   lse_i = logsumexp_{j not in E(i)} s_ij
    rank_i = 1 + #{ j not in E(i), j != pos(i) : s_ij > s_i,pos(i) }     (1 = best)

Backward (g = d loss, a scalar):

    dS_ij = g / (B * temperature) * (softmax_ij - [j == pos(i)]),
            softmax_ij = exp(s_ij - lse_i) for j not in E(i), 0 for j in E(i)
    dq = dS p,   dp = dS^T q

so the forward keeps only lse [B] (fp32) besides the inputs, and the backward recomputes the
score tiles. Default layout (positive_index None): P = B * n, query i's positive is passage
i * n followed by its n - 1 hard negatives; every passage is a negative of every other query.

The loss is returned in fp32 (fp64 for fp64 inputs) whatever the input dtype; gradients come
back in the input dtype. Ties in the rank are decided on the fp32 scores.
"""
from __future__ import annotations

import math

import torch

from embedcore import backends

# The C++ and Triton launch modules, one protocol: forward(q, p, positive_index, passage_ids,
# temperature) -> (lse [B], row_loss [B], ranks [B]); backward(q, p, positive_index, passage_ids, lse,
# scale, temperature, need_q, need_p) -> (dq or None, dp or None).
IMPLEMENTATIONS = backends.Implementations(
    op="contrastive_loss", cpp="embedcore.ops._contrastive_cpp", triton="embedcore.kernels.contrastive")


def default_positive_index(B: int, P: int, device=None, op: str = "contrastive_loss") -> torch.Tensor:
    """Query i's positive is passage i * (P // B): the "1 positive + n-1 hard negatives" layout.
    `op` names the calling op in the error (maxsim_contrastive_loss shares the layout)."""
    if B <= 0 or P % B != 0:
        raise ValueError(
            f"{op}: with the default layout (positive_index=None) P must be a positive multiple "
            f"of B (1 positive + n-1 hard negatives per query), got B={B}, P={P}; pass positive_index for other layouts"
        )
    return torch.arange(B, device=device, dtype=torch.int64) * (P // B)


def excluded_mask(positive_index: torch.Tensor, passage_ids: torch.Tensor | None, P: int) -> torch.Tensor:
    """[B, P] bool: column j is left out of query i's denominator (a copy of its positive).
    Used by the reference only: the fast backends test this per tile."""
    B = positive_index.shape[0]
    if passage_ids is None:
        return torch.zeros(B, P, dtype=torch.bool, device=positive_index.device)
    excluded = passage_ids[None, :] == passage_ids[positive_index][:, None]
    excluded[torch.arange(B, device=positive_index.device), positive_index] = False
    return excluded


def contrastive_loss_reference(q, p, temperature=0.02, positive_index=None, passage_ids=None, return_ranks=False):
    """The readable specification: the whole [B, P] matrix in the accumulation dtype (fp32 for
    fp32/bf16/fp16 inputs, fp64 for fp64), differentiable through plain torch."""
    _check(q, p, temperature, positive_index, passage_ids)
    B, P = q.shape[0], p.shape[0]
    pos = default_positive_index(B, P, q.device) if positive_index is None else positive_index.to(torch.int64)
    ids = None if passage_ids is None else passage_ids.to(torch.int64)
    acc = backends.accumulation_dtype(q.dtype)
    s = (q.to(acc) @ p.to(acc).T) / temperature
    s = s.masked_fill(excluded_mask(pos, ids, P), float("-inf"))
    s_pos = s[torch.arange(B, device=q.device), pos]
    loss = (torch.logsumexp(s, dim=1) - s_pos).mean()
    if not return_ranks:
        return loss
    ranks = 1 + (s.detach() > s_pos.detach()[:, None]).sum(1)
    return loss, ranks


def _shape(t):
    return tuple(getattr(t, "shape", ()))


def _host_reads_are_free(device: torch.device) -> bool:
    """True where reading a value back costs nothing (CPU); on an accelerator it waits for the stream."""
    return device.type == "cpu"


def check_positive_range(positive_index: torch.Tensor, P: int, op: str = "contrastive_loss") -> None:
    """0 <= positive_index < P. On CPU a ValueError naming the bad value. Elsewhere (CUDA) a
    device-side assert: reading min/max back would make every micro-step of a multi-rank training
    run (which passes an explicit layout) wait for the GPU; a bad index stops the CUDA context with
    this message at the next synchronisation, before any result is read. `op` names the caller."""
    if _host_reads_are_free(positive_index.device):
        lo, hi = int(positive_index.min()), int(positive_index.max())
        if lo < 0 or hi >= P:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: positive_index holds {bad}, out of range for P={P} passages "
                             f"(expected 0 <= index < {P})")
        return
    in_range = ((positive_index >= 0) & (positive_index < P)).all()
    torch._assert_async(in_range, f"{op}: positive_index out of range for P={P} passages "
                                  f"(expected 0 <= index < {P})")


def _check(q, p, temperature, positive_index, passage_ids):
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"contrastive_loss: q must be a [B, D] tensor, got shape {_shape(q)}")
    if not isinstance(p, torch.Tensor) or p.dim() != 2:
        raise ValueError(f"contrastive_loss: p must be a [P, D] tensor, got shape {_shape(p)}")
    if not q.is_floating_point() or not p.is_floating_point():
        raise ValueError(f"contrastive_loss: q and p must be floating point, got {q.dtype} and {p.dtype}")
    if q.dtype != p.dtype:
        raise ValueError(f"contrastive_loss: q and p must share a dtype, got q {q.dtype} and p {p.dtype}")
    if q.device != p.device:
        raise ValueError(f"contrastive_loss: q and p must be on one device, got {q.device} and {p.device}")
    B, P = q.shape[0], p.shape[0]
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"contrastive_loss: q is [B, D] = {_shape(q)} and p is [P, D] = {_shape(p)}: D must match")
    if B == 0 or P == 0:
        raise ValueError(f"contrastive_loss: need at least one query and one passage, got B={B}, P={P}")
    if isinstance(temperature, torch.Tensor):
        raise ValueError("contrastive_loss: temperature must be a Python number (a fixed hyper-parameter), got a tensor")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"contrastive_loss: temperature must be a finite number > 0, got {temperature!r}")
    if positive_index is None:
        default_positive_index(B, P)  # raises when P is not a multiple of B
    else:
        if not isinstance(positive_index, torch.Tensor) or tuple(positive_index.shape) != (B,):
            raise ValueError(f"contrastive_loss: positive_index must be a [B] = [{B}] tensor, got shape {_shape(positive_index)}")
        if positive_index.is_floating_point() or positive_index.is_complex() or positive_index.dtype == torch.bool:
            raise ValueError(f"contrastive_loss: positive_index must be of an integer dtype (int64), got {positive_index.dtype}")
        if positive_index.device != q.device:
            raise ValueError(f"contrastive_loss: positive_index is on {positive_index.device}, q on {q.device}")
        check_positive_range(positive_index, P)
    if passage_ids is not None:
        if not isinstance(passage_ids, torch.Tensor) or tuple(passage_ids.shape) != (P,):
            raise ValueError(f"contrastive_loss: passage_ids must be a [P] = [{P}] tensor (one id per passage), got shape {_shape(passage_ids)}")
        if passage_ids.is_floating_point() or passage_ids.is_complex() or passage_ids.dtype == torch.bool:
            raise ValueError(f"contrastive_loss: passage_ids must be of an integer dtype (int64), got {passage_ids.dtype}")
        if passage_ids.device != q.device:
            raise ValueError(f"contrastive_loss: passage_ids is on {passage_ids.device}, q on {q.device}")


class ContrastiveLossFunction(torch.autograd.Function):
    """Forward: per-row lse and loss (and ranks) tile by tile; saves q, p, lse, the layout.
    Backward: recomputes the score tiles to form dS and contracts it with p and q."""

    @staticmethod
    def forward(ctx, q, p, positive_index, passage_ids, temperature, backend):
        ctx.launch, ctx.temperature = IMPLEMENTATIONS.launch(backend), temperature
        lse, row_loss, ranks = ctx.launch.forward(q, p, positive_index, passage_ids, temperature)
        ctx.save_for_backward(q, p, positive_index, passage_ids, lse)
        ctx.mark_non_differentiable(ranks)
        return row_loss.mean(), ranks

    @staticmethod
    def backward(ctx, grad_loss, _grad_ranks):
        q, p, positive_index, passage_ids, lse = ctx.saved_tensors
        need_q, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_q or need_p):
            return None, None, None, None, None, None
        # dS carries g / (B * temperature); g stays a 0-dim tensor (no host sync).
        scale = grad_loss.to(backends.accumulation_dtype(q.dtype)) / (q.shape[0] * ctx.temperature)
        dq, dp = ctx.launch.backward(q, p, positive_index, passage_ids, lse, scale, ctx.temperature, need_q, need_p)
        return dq, dp, None, None, None, None


def contrastive_loss(q, p, temperature=0.02, positive_index=None, passage_ids=None, return_ranks=False, backend=None):
    """InfoNCE of B queries against P passages without building the [B, P] score matrix.

    q [B, D], p [P, D] (fp32/bf16/fp16/fp64, one dtype). positive_index [B] (integer): the
    positive column of each query; None means the layout "query i's positive is passage
    i * (P // B), followed by its hard negatives" (P must be a multiple of B). passage_ids [P]
    (integer): a passage with the id of query i's positive, other than the positive itself, is
    left out of query i's denominator. Returns the mean loss (0-dim, fp32; fp64 for fp64
    inputs), or (loss, ranks) with ranks [B] int64 the rank of each positive among its
    candidates (1 = best, only strictly greater scores count) when return_ranks is True.
    """
    _check(q, p, temperature, positive_index, passage_ids)
    name = backends.resolve(backend, q, p)
    if name == "torch":
        return contrastive_loss_reference(q, p, temperature, positive_index, passage_ids, return_ranks)
    B, P = q.shape[0], p.shape[0]
    pos = default_positive_index(B, P, q.device) if positive_index is None else positive_index.to(torch.int64).contiguous()
    ids = None if passage_ids is None else passage_ids.to(torch.int64).contiguous()
    loss, ranks = ContrastiveLossFunction.apply(q.contiguous(), p.contiguous(), pos, ids, float(temperature), name)
    return (loss, ranks) if return_ranks else loss

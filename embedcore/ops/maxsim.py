"""maxsim_contrastive_loss: late-interaction (ColBERT) InfoNCE, tile by tile; maxsim_scores: its
blockwise scorer (forward only, for validation, mining and evaluation).

Token embeddings q_tok [B, Lq, D] with q_mask [B, Lq], p_tok [P, Lp, D] with p_mask [P, Lp]; a
token is real where its mask is nonzero (either padding side, any pattern). With Q(b) the real
tokens of query b and T(j) those of passage j:

    M[b, i, j] = max_{t in T(j)} <q_tok[b, i], p_tok[j, t]>
    S[b, j]    = sum_{i in Q(b)} M[b, i, j]          (0 when Q(b) or T(j) is empty)

and then exactly the pooled loss of embedcore.ops.contrastive on s = S / temperature, with pos(b)
the positive passage of query b and E(b) the passages sharing its id (other than itself):

    loss   = mean_b [ lse_b - s_b,pos(b) ],   lse_b = logsumexp_{j not in E(b)} s_bj
    rank_b = 1 + #{ j not in E(b), j != pos(b) : s_bj > s_b,pos(b) }     (1 = best)

Tie rule: t*(b, i, j) is the FIRST real token (lowest index) that reaches the max; the gradient of
M[b, i, j] goes to that token only (a subgradient; torch.max(dim), which the reference uses, picks
the same one). Backward, with g the loss gradient:

    dS_bj    = g / (B * temperature) * (softmax_bj - [j == pos(b)]),   softmax_bj = 0 for j in E(b)
    dq[b, i] = sum_j dS_bj p_tok[j, t*(b, i, j)]                       (i in Q(b), T(j) non-empty)
    dp[j, t] = sum_{b, i in Q(b) : t*(b, i, j) = t} dS_bj q_tok[b, i]
    padded positions get 0.

The fast backends (cpp, triton) never hold the [B, P, Lq, Lp] similarities: per (query block,
passage block) tile they compute the tile's token similarities, the masked max over each passage's
tokens per query token and the sum over real query tokens; the forward keeps lse [B] only (and
an online log-sum-exp / rank count per query), the backward recomputes each tile with its argmax
and scatters dS_bj straight into dq (from p at t*) and dp (at t*, from q): no stored
B x P x Lq index or value tensor, only what one tile needs.

Like contrastive_loss: default layout (positive_index None): P = B * n, query b's positive is
passage b * n; the loss is fp32 (fp64 for fp64 inputs), gradients come back in the input dtype;
ranks are decided on the accumulation-dtype scores. A NaN or inf in a real token makes the loss
NaN (as the reference's would be non-finite); values at padded positions are never used.
"""
from __future__ import annotations

import math

import torch

from embedcore import backends
from embedcore.ops.contrastive import check_positive_range, default_positive_index, excluded_mask

OP = "maxsim_contrastive_loss"

# The C++ and Triton launch modules, one protocol (contiguous tokens, bool masks, int64 layout):
# forward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, temperature) -> (lse [B],
# row_loss [B], ranks [B]); backward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse,
# scale, temperature, need_q, need_p) -> (dq or None, dp or None); scores(q_tok, q_mask, p_tok,
# p_mask) -> S [B, P] (maxsim_scores).
IMPLEMENTATIONS = backends.Implementations(
    op=OP, cpp="embedcore.ops._maxsim_cpp", triton="embedcore.kernels.maxsim",
    protocol=("forward", "backward", "scores"))


def maxsim_scores_reference(q_tok, q_mask, p_tok, p_mask):
    """S [B, P] in the accumulation dtype through the whole [B, P, Lq, Lp] similarity tensor
    (the readable specification; differentiable, gradient to the first argmax on ties)."""
    acc = backends.accumulation_dtype(q_tok.dtype)
    qm, pm = q_mask != 0, p_mask != 0
    # Padded positions are zeroed first so that whatever they hold (even NaN) reaches nothing.
    q = torch.where(qm[..., None], q_tok.to(acc), 0)
    p = torch.where(pm[..., None], p_tok.to(acc), 0)
    sim = torch.einsum("bid,jtd->bjit", q, p).masked_fill(~pm[None, :, None, :], float("-inf"))
    best = sim.max(dim=-1).values  # [B, P, Lq]; torch.max(dim) routes the gradient to the first max
    best = torch.where(pm.any(1)[None, :, None] & qm[:, None, :], best, 0)
    return best.sum(-1)


def maxsim_contrastive_loss_reference(q_tok, q_mask, p_tok, p_mask, temperature, positive_index=None,
                                      passage_ids=None, return_ranks=False):
    """The loss of the module docstring through maxsim_scores_reference and a plain
    log-sum-exp over the masked [B, P] scores."""
    _check(q_tok, q_mask, p_tok, p_mask, temperature, positive_index, passage_ids)
    B, P = q_tok.shape[0], p_tok.shape[0]
    pos = default_positive_index(B, P, q_tok.device, OP) if positive_index is None else positive_index.to(torch.int64)
    ids = None if passage_ids is None else passage_ids.to(torch.int64)
    s = maxsim_scores_reference(q_tok, q_mask, p_tok, p_mask) / temperature
    s = s.masked_fill(excluded_mask(pos, ids, P), float("-inf"))
    s_pos = s[torch.arange(B, device=s.device), pos]
    loss = (torch.logsumexp(s, dim=1) - s_pos).mean()
    if not return_ranks:
        return loss
    return loss, 1 + (s.detach() > s_pos.detach()[:, None]).sum(1)


def _shape(t):
    return tuple(getattr(t, "shape", ()))


def _check_tokens(q_tok, q_mask, p_tok, p_mask, op=OP):
    """Shapes, dtypes and devices of the token embeddings and their masks."""
    for name, t, dims in (("q_tok", q_tok, "[B, Lq, D]"), ("p_tok", p_tok, "[P, Lp, D]")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: {name} must be a {dims} tensor, got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    if q_tok.dtype != p_tok.dtype:
        raise ValueError(f"{op}: q_tok and p_tok must share a dtype, got q_tok {q_tok.dtype} and p_tok {p_tok.dtype}")
    if q_tok.device != p_tok.device:
        raise ValueError(f"{op}: q_tok and p_tok must be on one device, got {q_tok.device} and {p_tok.device}")
    if q_tok.shape[2] != p_tok.shape[2]:
        raise ValueError(f"{op}: q_tok is [B, Lq, D] = {_shape(q_tok)} and p_tok is [P, Lp, D] = {_shape(p_tok)}: D must match")
    for name, m, t, dims in (("q_mask", q_mask, q_tok, "[B, Lq]"), ("p_mask", p_mask, p_tok, "[P, Lp]")):
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(t.shape[:2]):
            raise ValueError(f"{op}: {name} must be a {dims} = {list(t.shape[:2])} tensor, got shape {_shape(m)}")
        if m.is_complex():
            raise ValueError(f"{op}: {name} must be 0/1 (bool, integer or float), got {m.dtype}")
        if m.device != t.device:
            raise ValueError(f"{op}: {name} is on {m.device}, its tokens on {t.device}")
    B, Lq, D = q_tok.shape
    P, Lp = p_tok.shape[:2]
    if B == 0 or P == 0:
        raise ValueError(f"{op}: need at least one query and one passage, got B={B}, P={P}")
    if Lq == 0:
        raise ValueError(f"{op}: q_mask is empty (Lq = 0 query tokens): every query needs a token axis")
    if Lp == 0:
        raise ValueError(f"{op}: p_mask is empty (Lp = 0 passage tokens): every passage needs a token axis")
    if D == 0:
        raise ValueError(f"{op}: q_tok and p_tok have D = 0")


def _check_index(name, t, n, dims, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
        raise ValueError(f"{OP}: {name} must be a {dims} = [{n}] tensor, got shape {_shape(t)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{OP}: {name} must be of an integer dtype (int64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{OP}: {name} is on {t.device}, q_tok on {device}")


def _check(q_tok, q_mask, p_tok, p_mask, temperature, positive_index, passage_ids):
    _check_tokens(q_tok, q_mask, p_tok, p_mask)
    B, P = q_tok.shape[0], p_tok.shape[0]
    if isinstance(temperature, torch.Tensor):
        raise ValueError(f"{OP}: temperature must be a Python number (a fixed hyper-parameter), got a tensor")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{OP}: temperature must be a finite number > 0, got {temperature!r}")
    if positive_index is None:
        default_positive_index(B, P, op=OP)  # raises when P is not a multiple of B
    else:
        _check_index("positive_index", positive_index, B, "[B]", q_tok.device)
        check_positive_range(positive_index, P, OP)
    if passage_ids is not None:
        _check_index("passage_ids", passage_ids, P, "[P] (one id per passage)", q_tok.device)


def _nonfinite_real_tokens(tok, mask):
    """[N] bool: row n has a real token holding a NaN or inf (one norm per token: no copy of tok)."""
    with torch.no_grad():
        return (~torch.isfinite(torch.linalg.vector_norm(tok, dim=-1)) & mask).any(1)


def _kernel_inputs(q_tok, q_mask, p_tok, p_mask):
    """Contiguous tokens and bool masks, as the cpp and triton launch helpers take them."""
    return q_tok.contiguous(), (q_mask != 0).contiguous(), p_tok.contiguous(), (p_mask != 0).contiguous()


class MaxSimContrastiveLossFunction(torch.autograd.Function):
    """Forward: lse, row losses and ranks tile by tile; saves the inputs and lse [B].
    Backward: recomputes each tile and its first argmax, scatters dS into dq and dp."""

    @staticmethod
    def forward(ctx, q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, temperature, backend):
        ctx.launch, ctx.temperature = IMPLEMENTATIONS.launch(backend), temperature
        lse, row_loss, ranks = ctx.launch.forward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids,
                                                  temperature)
        ctx.save_for_backward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse)
        ctx.mark_non_differentiable(ranks)
        return row_loss.mean(), ranks

    @staticmethod
    def backward(ctx, grad_loss, _grad_ranks):
        q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse = ctx.saved_tensors
        need_q, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_q or need_p):
            return (None,) * 8
        scale = grad_loss.to(backends.accumulation_dtype(q_tok.dtype)) / (q_tok.shape[0] * ctx.temperature)  # 0-dim: no host sync
        dq, dp = ctx.launch.backward(q_tok, q_mask, p_tok, p_mask, positive_index, passage_ids, lse, scale,
                                     ctx.temperature, need_q, need_p)
        return dq, None, dp, None, None, None, None, None


def maxsim_contrastive_loss(q_tok, q_mask, p_tok, p_mask, temperature, positive_index=None, passage_ids=None,
                            return_ranks=False, backend=None):
    """Late-interaction (ColBERT MaxSim) InfoNCE of B queries against P passages, never building
    the [B, P, Lq, Lp] token similarities (see the module docstring for the maths).

    q_tok [B, Lq, D], p_tok [P, Lp, D] (fp32/bf16/fp16/fp64, one dtype; typically L2-normalised
    per token, as pool_l2 mode "colbert" gives), q_mask [B, Lq], p_mask [P, Lp] (nonzero = real
    token; any padding side; a query or passage without real tokens scores 0). temperature: the
    scores S (a sum over query tokens) are divided by it. positive_index [B] (integer): each
    query's positive passage; None means passage b * (P // B). passage_ids [P] (integer): a
    passage with the id of query b's positive, other than the positive, is left out of query b's
    denominator. Returns the mean loss (0-dim, fp32; fp64 for fp64 inputs), or (loss, ranks [B]
    int64, 1 = best) when return_ranks is True.
    """
    _check(q_tok, q_mask, p_tok, p_mask, temperature, positive_index, passage_ids)
    name = backends.resolve(backend, q_tok, p_tok)
    if name == "torch":
        return maxsim_contrastive_loss_reference(q_tok, q_mask, p_tok, p_mask, temperature, positive_index,
                                                 passage_ids, return_ranks)
    B, P = q_tok.shape[0], p_tok.shape[0]
    q, qm, p, pm = _kernel_inputs(q_tok, q_mask, p_tok, p_mask)
    pos = default_positive_index(B, P, q.device, OP) if positive_index is None else positive_index.to(torch.int64).contiguous()
    ids = None if passage_ids is None else passage_ids.to(torch.int64).contiguous()
    loss, ranks = MaxSimContrastiveLossFunction.apply(q, qm, p, pm, pos, ids, float(temperature), name)
    # The kernels' masked max skips non-finite values; the reference's would carry them into the loss.
    bad = _nonfinite_real_tokens(q, qm).any() | _nonfinite_real_tokens(p, pm).any()
    loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
    return (loss, ranks) if return_ranks else loss


def maxsim_scores(q_tok, q_mask, p_tok, p_mask, backend=None, passage_block: int = 64):
    """S [B, P] (accumulation dtype, no gradient): the MaxSim score of every query against every
    passage, blockwise (cpp, triton: tile by tile; torch: the reference `passage_block` passages at
    a time, so at most [B, passage_block, Lq, Lp] exists). For validation, mining and evaluation."""
    _check_tokens(q_tok, q_mask, p_tok, p_mask, op="maxsim_scores")
    if not (isinstance(passage_block, int) and passage_block > 0):
        raise ValueError(f"maxsim_scores: passage_block must be a positive int, got {passage_block!r}")
    name = backends.resolve(backend, q_tok, p_tok)
    with torch.no_grad():
        if name == "torch":
            return torch.cat([maxsim_scores_reference(q_tok, q_mask, p_tok[j:j + passage_block],
                                                      p_mask[j:j + passage_block])
                              for j in range(0, p_tok.shape[0], passage_block)], dim=1)
        q, qm, p, pm = _kernel_inputs(q_tok, q_mask, p_tok, p_mask)
        s = IMPLEMENTATIONS.launch(name).scores(q, qm, p, pm)
        # As the reference: a non-finite real token makes its pairs NaN (where the other side has tokens).
        q_bad, p_bad = _nonfinite_real_tokens(q, qm), _nonfinite_real_tokens(p, pm)
        bad = (q_bad[:, None] & pm.any(1)[None, :]) | (p_bad[None, :] & qm.any(1)[:, None])
        return torch.where(bad, torch.full_like(s, float("nan")), s)

"""The training and validation objectives over pooled embeddings (and colbert token vectors).

Training: every passage of the global batch (all ranks) is a candidate for every query; a
query's positive is its own first passage; passages sharing the positive's id elsewhere in the
batch are masked (not counted as negatives). Pooled embeddings go through the fused
`contrastive_loss`; colbert token vectors through a plain MaxSim (sum over query tokens of the
max over passage tokens) and a cross-entropy with the same masking.

Validation: each query against its own candidate group (1 positive + eval_negative_size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from embedcore.ops.contrastive import contrastive_loss
from embedcore.train.distributed import DistInfo, gather_no_grad, gather_with_grad


def global_positive_index(local_batch: int, n_passages: int, info: DistInfo, device) -> torch.Tensor:
    """Column of each local query's positive in the gathered passages [world * B * n]."""
    return (info.rank * local_batch + torch.arange(local_batch, device=device)) * n_passages


def pooled_train_loss(q, p, passage_ids, temperature: float, info: DistInfo, backend=None):
    """InfoNCE of the local queries q [B, D] against the passages of every rank (p [B*n, D] here,
    gathered with gradients); passage_ids [B*n] (int64) mask copies of a query's positive."""
    B, n = q.shape[0], p.shape[0] // q.shape[0]
    p_all = gather_with_grad(p, info)
    ids_all = None if passage_ids is None else gather_no_grad(passage_ids, info)
    pos = None if info.world_size == 1 else global_positive_index(B, n, info, q.device)
    return contrastive_loss(q, p_all, temperature, positive_index=pos, passage_ids=ids_all, backend=backend)


def maxsim_scores(q_tok, q_mask, p_tok, p_mask, chunk: int = 64) -> torch.Tensor:
    """ColBERT late interaction: score[b, j] = sum_i over real query tokens of max_t over real
    passage tokens of <q_tok[b, i], p_tok[j, t]>. q_tok [B, Lq, D], p_tok [P, Lp, D] (fp32
    accumulation); returns [B, P]. Passages are taken `chunk` at a time to bound the
    [B, chunk, Lq, Lp] intermediate."""
    q = q_tok.float() * q_mask[..., None].float()
    out = []
    for s in range(0, p_tok.shape[0], chunk):
        p = p_tok[s:s + chunk].float()
        sim = torch.einsum("bid,jtd->bjit", q, p)  # [B, chunk, Lq, Lp]
        sim = sim.masked_fill(~p_mask[s:s + chunk].bool()[None, :, None, :], float("-inf"))
        best = sim.amax(-1)
        best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))  # a passage with no tokens
        out.append((best * q_mask.float()[:, None, :]).sum(-1))
    return torch.cat(out, 1)


def masked_cross_entropy(scores, positive_index, passage_ids=None, return_ranks=False):
    """Cross-entropy of [B, P] scores (already divided by the temperature) with query i's target
    column positive_index[i]; columns sharing the positive's passage id are masked out."""
    B = scores.shape[0]
    rows = torch.arange(B, device=scores.device)
    if passage_ids is not None:
        same = passage_ids[None, :] == passage_ids[positive_index][:, None]
        same[rows, positive_index] = False
        scores = scores.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(scores, positive_index)
    if not return_ranks:
        return loss
    s_pos = scores[rows, positive_index]
    ranks = 1 + (scores.detach() > s_pos.detach()[:, None]).sum(1)
    return loss, ranks


def _pad_tokens(x, length: int):
    if x.shape[1] == length:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad)


def colbert_train_loss(q_tok, q_mask, p_tok, p_mask, passage_ids, temperature: float, info: DistInfo,
                       max_passage_len: int):
    """MaxSim InfoNCE of the local queries against the token vectors of every rank's passages.
    Under several ranks the passages are padded to `max_passage_len` (the longest the collator can
    produce) before the gather: a length every rank knows, so agreeing on it costs no host sync."""
    B, n = q_tok.shape[0], p_tok.shape[0] // q_tok.shape[0]
    if info.world_size > 1:
        if p_tok.shape[1] > max_passage_len:
            raise ValueError(f"colbert: passages of {p_tok.shape[1]} tokens exceed max_passage_len {max_passage_len}")
        p_tok, p_mask = _pad_tokens(p_tok, max_passage_len), _pad_tokens(p_mask, max_passage_len)
    p_all = gather_with_grad(p_tok, info)
    m_all = gather_no_grad(p_mask, info)
    ids_all = None if passage_ids is None else gather_no_grad(passage_ids, info)
    scores = maxsim_scores(q_tok, q_mask, p_all, m_all) / temperature
    pos = global_positive_index(B, n, info, q_tok.device)
    return masked_cross_entropy(scores, pos, ids_all)


def group_metrics_pooled(q, p, temperature: float, backend=None):
    """Validation on each query's own group: q [B, D], p [B*G, D] with query i's candidates at
    rows i*G .. i*G+G-1 (positive first). Returns (loss [B] fp32, rank of the positive [B],
    1 = best), without a host sync."""
    B = q.shape[0]
    G = p.shape[0] // B
    losses, ranks = [], []
    for i in range(B):  # one tiny contrastive_loss call per group: only its G candidates count
        loss, rank = contrastive_loss(q[i:i + 1], p[i * G:(i + 1) * G], temperature,
                                      positive_index=torch.zeros(1, dtype=torch.int64, device=q.device),
                                      return_ranks=True, backend=backend)
        losses.append(loss.float().reshape(1))
        ranks.append(rank.reshape(1))
    return torch.cat(losses), torch.cat(ranks)


def group_metrics_colbert(q_tok, q_mask, p_tok, p_mask, temperature: float):
    """group_metrics_pooled for colbert token vectors (MaxSim scores within each group)."""
    B = q_tok.shape[0]
    G = p_tok.shape[0] // B
    losses, ranks = [], []
    zero = torch.zeros(1, dtype=torch.int64, device=q_tok.device)
    for i in range(B):
        s = maxsim_scores(q_tok[i:i + 1], q_mask[i:i + 1], p_tok[i * G:(i + 1) * G], p_mask[i * G:(i + 1) * G])
        loss, rank = masked_cross_entropy(s / temperature, zero, return_ranks=True)
        losses.append(loss.reshape(1))
        ranks.append(rank.reshape(1))
    return torch.cat(losses), torch.cat(ranks)

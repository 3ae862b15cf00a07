"""The training objective: how a batch's embeddings become the training loss and the
per-group validation metrics. Built once from the config (`build_objective`); the step loop and
validation call it and never branch on the pooling mode.

- `PooledObjective` (avg, weighted_avg, cls, last): one vector per text, the fused
  `contrastive_loss` op.
- `ColbertObjective` (colbert): one vector per token, the fused `maxsim_contrastive_loss` op
  (late interaction, never a [B, P, Lq, Lp] similarity tensor).

Training: every passage of the global batch (all ranks, gathered with gradients flowing back to
their owners) is a candidate for every query; a query's positive is its own first passage;
passages sharing the positive's id elsewhere in the batch are masked by the op, not counted as
negatives.
Validation: each query against its own candidate group (1 positive + eval_negative_size),
giving per-query loss [B] and rank of the positive [B] (1 = best), without a host sync.

A new loss family is a class with the same methods (`train_loss`, `group_metrics`, `stats`), a
branch in `build_objective` and, for settings it cannot honour, a check in `check_objective_config`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from embedcore.backends import accumulation_dtype
from embedcore.errors import ConfigError
from embedcore.ops.contrastive import contrastive_loss
from embedcore.ops.matryoshka import filtered_contrastive_loss, matryoshka_contrastive_loss
from embedcore.ops.maxsim import maxsim_contrastive_loss
from embedcore.distributed import DistInfo, gather_no_grad, gather_with_grad


def global_positive_index(local_batch: int, n_passages: int, info: DistInfo, device) -> torch.Tensor:
    """Column of each local query's positive in the gathered passages [world * B * n]."""
    return (info.rank * local_batch + torch.arange(local_batch, device=device)) * n_passages


def _group_loop(n_queries: int, group_size: int, one_group):
    """(loss [B] fp32, rank [B]) from one op call per query over its own G candidates (positive
    first): only those G count, and a call's mean loss over one query is that query's loss."""
    losses, ranks = [], []
    for i in range(n_queries):
        loss, rank = one_group(slice(i, i + 1), slice(i * group_size, (i + 1) * group_size))
        losses.append(loss.float().reshape(1))
        ranks.append(rank.reshape(1))
    return torch.cat(losses), torch.cat(ranks)


def _first(n: int, device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64, device=device)


class PooledObjective:
    """InfoNCE over pooled embeddings q [B, D], p [B*n, D] (the masks are not needed), with the
    optional loss terms of a `loss:` section (embedcore.train.config LossConfig; None: plain InfoNCE):

    - matryoshka_dims / matryoshka_weights: the InfoNCE summed over prefixes of the embedding, each
      normalised on its own, in one pass over the tiles (matryoshka_contrastive_loss);
    - false_negative_margin / false_negative_delta: a candidate scoring above min(margin * s_pos,
      s_pos - delta) (cosine, before the temperature) is left out like an id copy of the positive,
      and counted (filtered_contrastive_loss; with Matryoshka, per prefix);
    - symmetric_weight: plus that weight times the passage-to-query InfoNCE: each query's positive
      passage against every query of the global batch (queries whose positive has the same id
      masked), the same variant as the query side;
    - distill_weight / distill_temperature: plus that weight times KL(teacher || student) over each
      query's own group, the teacher's distribution softmax(teacher_scores / distill_temperature),
      the student's softmax(q . p / temperature).
    """

    def __init__(self, temperature: float, loss=None, backend: str | None = None):
        self.temperature, self.loss, self.backend = temperature, loss, backend
        self.masked = None  # candidates the false-negative filter left out since the last stats()

    def _infonce(self, a, b, positive_index, ids) -> torch.Tensor:
        """The configured InfoNCE variant of rows a against candidates b."""
        L, T = self.loss, self.temperature
        margin = None if L is None else L.false_negative_margin
        delta = None if L is None else L.false_negative_delta
        if L is not None and L.matryoshka_dims:
            loss, masked = matryoshka_contrastive_loss(a, b, T, dims=L.matryoshka_dims, weights=L.matryoshka_weights,
                                                       positive_index=positive_index, passage_ids=ids, margin=margin,
                                                       delta=delta, return_masked=True, backend=self.backend)
            if margin is None and delta is None:
                return loss
            masked = masked[:, 0]  # counted at the first (usually the full) prefix
        elif margin is not None or delta is not None:
            loss, masked = filtered_contrastive_loss(a, b, T, margin=margin, delta=delta, positive_index=positive_index,
                                                     passage_ids=ids, backend=self.backend)
        else:
            return contrastive_loss(a, b, T, positive_index=positive_index, passage_ids=ids, backend=self.backend)
        total = masked.sum()
        self.masked = total if self.masked is None else self.masked + total
        return loss

    def train_loss(self, q, q_mask, p, p_mask, passage_ids, info: DistInfo, teacher_scores=None) -> torch.Tensor:
        B, n = q.shape[0], p.shape[0] // q.shape[0]
        p_all = gather_with_grad(p, info)
        ids_all = None if passage_ids is None else gather_no_grad(passage_ids, info)
        pos = None if info.world_size == 1 else global_positive_index(B, n, info, q.device)
        loss = self._infonce(q, p_all, pos, ids_all)
        L = self.loss
        if L is not None and L.symmetric_weight:
            q_all = gather_with_grad(q, info)
            # a query's id is its positive's: queries sharing a positive are not each other's negatives
            q_ids = None if ids_all is None else ids_all[::n]
            own = info.rank * B + torch.arange(B, device=q.device)
            loss = loss + L.symmetric_weight * self._infonce(p[::n], q_all, own, q_ids)
        if L is not None and L.distill_weight:
            if teacher_scores is None:
                raise ValueError("loss.distill_weight is set but the batch carries no teacher scores")
            acc = accumulation_dtype(q.dtype)  # [B, n] only: each query's own group
            student = torch.einsum("bd,bnd->bn", q.to(acc), p.to(acc).view(B, n, -1)) / self.temperature
            teacher = teacher_scores.to(acc) / L.distill_temperature
            kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                          reduction="batchmean")
            loss = loss + L.distill_weight * kl
        return loss

    def stats(self) -> dict:
        """Device counters since the last call (for the log line): {"fn_masked": n} when the
        false-negative filter is on."""
        if self.masked is None:
            return {}
        out, self.masked = {"fn_masked": self.masked}, None
        return out

    def group_metrics(self, q, q_mask, p, p_mask):
        zero = _first(1, q.device)
        return _group_loop(q.shape[0], p.shape[0] // q.shape[0], lambda qi, pj: contrastive_loss(
            q[qi], p[pj], self.temperature, positive_index=zero, return_ranks=True, backend=self.backend))


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])


class ColbertObjective:
    """MaxSim InfoNCE over token vectors q [B, Lq, D], p [B*n, Lp, D] with their attention masks.
    Under several ranks the passages are padded to `max_passage_len` (the longest the collator can
    produce) before the gather: a length every rank knows, so agreeing on it costs no host sync."""

    def __init__(self, temperature: float, max_passage_len: int, backend: str | None = None):
        self.temperature, self.max_passage_len, self.backend = temperature, max_passage_len, backend

    def train_loss(self, q, q_mask, p, p_mask, passage_ids, info: DistInfo, teacher_scores=None) -> torch.Tensor:
        B, n = q.shape[0], p.shape[0] // q.shape[0]
        if info.world_size > 1:
            if p.shape[1] > self.max_passage_len:
                raise ValueError(f"colbert: passages of {p.shape[1]} tokens exceed max_passage_len "
                                 f"{self.max_passage_len}")
            p, p_mask = _pad_tokens(p, self.max_passage_len), _pad_tokens(p_mask, self.max_passage_len)
        p_all = gather_with_grad(p, info)
        m_all = gather_no_grad(p_mask, info)
        ids_all = None if passage_ids is None else gather_no_grad(passage_ids, info)
        pos = global_positive_index(B, n, info, q.device)
        return maxsim_contrastive_loss(q, q_mask, p_all, m_all, self.temperature, positive_index=pos,
                                       passage_ids=ids_all, backend=self.backend)

    def stats(self) -> dict:
        return {}

    def group_metrics(self, q, q_mask, p, p_mask):
        zero = _first(1, q.device)
        return _group_loop(q.shape[0], p.shape[0] // q.shape[0], lambda qi, pj: maxsim_contrastive_loss(
            q[qi], q_mask[qi], p[pj], p_mask[pj], self.temperature, positive_index=zero, return_ranks=True,
            backend=self.backend))


def check_objective_config(cfg) -> None:
    """ConfigError for settings the configured objective cannot honour: ColBERT token vectors have
    no single-vector evaluation and train with the MaxSim InfoNCE alone (no loss: terms)."""
    if cfg.model.pooling != "colbert":
        return
    if cfg.evaluation is not None:
        raise ConfigError("evaluation: model.pooling colbert (multi-vector) cannot be evaluated by single-vector "
                          "retrieval; remove the evaluation section")
    L = cfg.loss
    terms = [k for k in ("symmetric_weight", "distill_weight") if getattr(L, k)] + \
        [k for k in ("matryoshka_dims", "false_negative_margin", "false_negative_delta") if getattr(L, k) is not None]
    if terms:
        raise ConfigError(f"loss.{terms[0]}: the loss terms apply to pooled embeddings; model.pooling colbert "
                          f"trains with the MaxSim InfoNCE alone")


def build_objective(cfg) -> PooledObjective | ColbertObjective:
    """The objective of a TrainConfig: colbert pooling trains with MaxSim, every other pooling
    with the pooled InfoNCE."""
    if cfg.model.pooling == "colbert":
        coll = cfg.dataloader.collate_fn
        multiple = coll.pad_to_multiple_of or 1
        return ColbertObjective(cfg.temperature, max_passage_len=-(-coll.p_max_len // multiple) * multiple)
    return PooledObjective(cfg.temperature, cfg.loss)

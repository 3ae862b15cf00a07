"""Hard-negative mining over one corpus: encode, score exactly in blocks, mask, filter, select.

For each query (COMPAT.md, Hard-negative mining, without the reference's shortfalls):
1. queries and corpus are embedded with the model's pooling, normalisation and prefixes
   (prefix + " " + text, as in training); under torchrun each rank encodes every
   world_size-th batch of the corpus and keeps those rows, the query embeddings are gathered;
2. each positive's score q . d is computed where its row lives and shared (all-reduce);
3. every rank scores the corpus rows it holds, tile by tile (retrieval.topk), with the query's
   positives masked by corpus index and scores above the margin threshold dropped:
   perc: score > margin * min_positive_score, abs: score > min_positive_score - margin;
4. the per-rank top (skip_top + n) lists are merged, the first skip_top ranks skipped, and the
   next n kept. A query with fewer surviving candidates gets fewer negatives, never -inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from embedcore import distributed as D
from embedcore.errors import ConfigError
from embedcore.retrieval.encode import encode_all, encode_texts
from embedcore.retrieval.topk import margin_threshold, sharded_topk


@dataclass
class MiningParams:
    """The knobs of one mining pass, defined (and documented) here once: embedcore.mine.MiningConfig
    extends them with the model, the files and the prefixes, and they are the `mining.` keys of its
    config. Checked when built (`__post_init__`: the config loader and library callers alike);
    errors name the dotted key."""

    hard_negatives_to_mine: int = 20
    """Negatives kept per query (fewer when too few candidates survive; counted in the summary)."""
    hard_neg_margin: float = 0.95
    """Margin of the false-negative filter (see hard_neg_margin_type)."""
    hard_neg_margin_type: Literal["perc", "abs"] = "perc"
    """perc: drop candidates scoring above margin * min positive score; abs: above min positive - margin."""
    hard_neg_skip_top_k: int = 0
    """Rank window: skip this many best surviving candidates before keeping hard_negatives_to_mine."""
    mining_batch_size: int = 128
    """Texts per encoding batch, and queries per scoring tile."""
    scoring_corpus_block: int = 16384
    """Corpus rows per scoring tile (a tile is mining_batch_size x scoring_corpus_block floats)."""
    query_max_length: int = 512
    """Queries are truncated to this many tokens."""
    passage_max_length: int = 512
    """Passages are truncated to this many tokens."""
    pad_to_multiple_of: Optional[int] = None
    """Pad token lengths to a multiple of this (8 helps tensor cores on GPU)."""
    progress: Optional[bool] = None
    """Progress bars (None: when stderr is a terminal)."""

    def __post_init__(self):
        for name in ("hard_negatives_to_mine", "mining_batch_size", "scoring_corpus_block", "query_max_length",
                     "passage_max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mining.{name} must be >= 1, got {getattr(self, name)}")
        margin = self.hard_neg_margin
        if not math.isfinite(margin) or (self.hard_neg_margin_type == "perc" and margin <= 0):
            raise ConfigError(f"mining.hard_neg_margin: must be a finite number (> 0 for perc), got {margin}")
        if self.hard_neg_skip_top_k < 0:
            raise ConfigError(f"mining.hard_neg_skip_top_k must be >= 0, got {self.hard_neg_skip_top_k}")


@dataclass
class MinedCorpus:
    """Per query: positive scores (aligned with its positives) and (negative index, score) lists."""

    positive_scores: list[list[float]]
    negatives: list[list[tuple[int, float]]]


def mine_corpus(model, queries: list[str], positives: list[list[int]], corpus_texts: list[str],
                params: MiningParams, desc: str = "") -> MinedCorpus:
    """Mine hard negatives for `queries` among `corpus_texts` (positives[i]: corpus indices of query i).

    Every rank must call this with the same arguments; every rank returns the same result."""
    n_q, n_c = len(queries), len(corpus_texts)
    if len(positives) != n_q:
        raise ValueError(f"{len(positives)} positive lists for {n_q} queries")
    tag = f" [{desc}]" if desc else ""
    common = dict(batch_size=params.mining_batch_size, pad_to_multiple_of=params.pad_to_multiple_of,
                  progress=params.progress)
    local_idx, local_emb = encode_texts(model, corpus_texts, kind="passage", max_length=params.passage_max_length,
                                        prefix=model.passage_prefix, sharded=D.is_distributed(),
                                        desc=f"encoding passages{tag}", **common)
    q_emb = encode_all(model, queries, kind="query", max_length=params.query_max_length,
                       prefix=model.query_prefix, desc=f"encoding queries{tag}", **common)

    pos_scores = _positive_scores(q_emb, positives, local_idx, local_emb, n_c)
    min_pos = torch.full((n_q,), float("inf"))
    flat_q = torch.tensor([q for q, rows in enumerate(positives) for _ in rows], dtype=torch.long)
    if flat_q.numel():
        min_pos = min_pos.scatter_reduce(0, flat_q, pos_scores, reduce="amin")
    threshold = margin_threshold(min_pos, params.hard_neg_margin, params.hard_neg_margin_type)

    k = params.hard_neg_skip_top_k + params.hard_negatives_to_mine
    top = sharded_topk(q_emb, local_emb, local_idx, n_c, k, exclude=positives, threshold=threshold,
                       query_block=params.mining_batch_size, corpus_block=params.scoring_corpus_block,
                       progress=params.progress, desc=f"scoring{tag}")
    top = top.window(params.hard_neg_skip_top_k, params.hard_negatives_to_mine)

    pos_lists, offset = [], 0
    for rows in positives:
        pos_lists.append(pos_scores[offset:offset + len(rows)].tolist())
        offset += len(rows)
    negatives = []
    for scores, idx in zip(top.scores.tolist(), top.indices.tolist()):
        negatives.append([(i, s) for i, s in zip(idx, scores) if i >= 0])
    return MinedCorpus(pos_lists, negatives)


def _positive_scores(q_emb, positives, local_idx, local_emb, n_c) -> torch.Tensor:
    """q . d for every (query, positive) pair, flattened in order; computed where d lives."""
    global_to_local = torch.full((n_c,), -1, dtype=torch.long)
    global_to_local[local_idx] = torch.arange(local_idx.numel())
    pair_q = [q for q, rows in enumerate(positives) for _ in rows]
    pair_d = [d for rows in positives for d in rows]
    scores = torch.full((len(pair_q),), float("inf"))
    if not pair_q:
        return scores
    loc = global_to_local[torch.tensor(pair_d, dtype=torch.long)]
    here = loc >= 0
    if here.any():
        qs = q_emb[torch.tensor(pair_q)[here].to(q_emb.device)]
        ds = local_emb[loc[here].to(local_emb.device)]
        scores[here] = (qs.float() * ds.float()).sum(1).cpu()
    return D.all_reduce_min(scores)  # each pair is held by exactly one rank; the others say +inf

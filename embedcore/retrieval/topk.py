"""Exact top-k of Q @ D^T in blocks, optionally sharded across ranks.

No [Q, N] score matrix ever exists: queries are taken `query_block` at a time and the corpus
`corpus_block` rows at a time; each [query_block, corpus_block] tile is reduced to its top k and
merged into a running top k. Under torch.distributed every rank scores the corpus rows it holds
(any subset, named by their global row index) and the per-rank top k are gathered and merged.

Per query, before selection:
- excluded rows (its positives, by global corpus index) are masked out;
- scores above a per-query threshold are dropped (the mining margin filter; +inf keeps all).
A query with fewer than k surviving candidates gets score -inf and index -1 in the missing slots
(callers drop those; they never reach an output file).

Ties are broken by ascending global corpus index when running top-k lists are merged, so the
result does not depend on how many ranks there were (ties at the edge of one tile's top k are
resolved by torch.topk, which only matters for exactly equal scores).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from embedcore import distributed as D

NEG_INF = float("-inf")


@dataclass
class TopK:
    """scores [Q, k] (descending, -inf where missing) and global corpus indices [Q, k] (-1 where missing)."""

    scores: torch.Tensor
    indices: torch.Tensor

    def counts(self) -> torch.Tensor:
        """Number of real candidates per query."""
        return (self.indices >= 0).sum(1)

    def window(self, start: int, count: int) -> "TopK":
        """Ranks start .. start+count-1 of each query (the rank window: skip the `start` best)."""
        if start < 0 or count < 1:
            raise ValueError(f"rank window needs start >= 0 and count >= 1, got start={start}, count={count}")
        return TopK(self.scores[:, start:start + count], self.indices[:, start:start + count])


def margin_threshold(min_positive_score: torch.Tensor, margin: float, margin_type: str) -> torch.Tensor:
    """Highest score a negative may have: `perc` -> margin * min_pos, `abs` -> min_pos - margin.

    A query without positive (min_pos = +inf) gets +inf, that is no filtering."""
    if margin_type == "perc":
        thr = min_positive_score * margin
    elif margin_type == "abs":
        thr = min_positive_score - margin
    else:
        raise ValueError(f"hard_neg_margin_type must be 'perc' or 'abs', got {margin_type!r}")
    return torch.where(torch.isinf(min_positive_score), min_positive_score, thr)


def merge_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> TopK:
    """Top k of candidate lists [Q, M] by (descending score, ascending index); -1 indices stay last."""
    # Order by index first (missing, -1, pushed past every real index), then a stable sort by
    # score keeps that order among equal scores.
    key = torch.where(indices < 0, torch.full_like(indices, torch.iinfo(torch.int64).max), indices)
    order = torch.argsort(key, dim=1, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    indices = torch.where(torch.isneginf(scores), torch.full_like(indices, -1), indices)
    if scores.shape[1] < k:  # fewer candidates than k overall: pad
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), NEG_INF)], 1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], 1)
    return TopK(scores, indices)


def _exclusion_pairs(exclude, num_queries: int, global_to_local: torch.Tensor):
    """(query, local row) pairs to mask, for the excluded rows this process holds."""
    if exclude is None:
        return None
    if len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
    q_list, r_list = [], []
    for q, rows in enumerate(exclude):
        for g in rows:
            if 0 <= g < len(global_to_local) and global_to_local[g] >= 0:
                q_list.append(q)
                r_list.append(int(global_to_local[g]))
    return torch.tensor(q_list, dtype=torch.long), torch.tensor(r_list, dtype=torch.long)


def blockwise_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    corpus_index: torch.Tensor | None = None,
    num_corpus: int | None = None,
    exclude: list[list[int]] | None = None,
    threshold: torch.Tensor | None = None,
    query_block: int = 1024,
    corpus_block: int = 8192,
    progress: bool | None = None,
    desc: str = "scoring",
) -> TopK:
    """Top k corpus rows per query by dot product, computed tile by tile.

    queries [Q, D]; corpus [N_local, D]; corpus_index [N_local] global row index of each local row
    (default 0..N_local-1); num_corpus the global corpus size (default max index + 1);
    exclude[q] global rows never returned for query q; threshold [Q]: scores above it dropped.
    """
    if queries.dim() != 2 or corpus.dim() != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"blockwise_topk: queries [Q, D] and corpus [N, D] expected, got {tuple(queries.shape)} and {tuple(corpus.shape)}")
    if k < 1:
        raise ValueError(f"blockwise_topk: k must be >= 1, got {k}")
    if query_block < 1 or corpus_block < 1:
        raise ValueError("blockwise_topk: query_block and corpus_block must be >= 1")
    device = corpus.device
    n_local = corpus.shape[0]
    if corpus_index is None:
        corpus_index = torch.arange(n_local, dtype=torch.long)
    corpus_index = corpus_index.to(device=device, dtype=torch.long)
    if corpus_index.shape != (n_local,):
        raise ValueError(f"blockwise_topk: corpus_index must be [{n_local}], got {tuple(corpus_index.shape)}")
    if num_corpus is None:
        num_corpus = int(corpus_index.max()) + 1 if n_local else 0
    global_to_local = torch.full((num_corpus,), -1, dtype=torch.long)
    global_to_local[corpus_index.cpu()] = torch.arange(n_local, dtype=torch.long)
    pairs = _exclusion_pairs(exclude, queries.shape[0], global_to_local)
    if threshold is not None:
        threshold = threshold.to(device=device, dtype=torch.float32).reshape(-1)
        if threshold.shape[0] != queries.shape[0]:
            raise ValueError(f"blockwise_topk: threshold must have {queries.shape[0]} entries, got {threshold.shape[0]}")

    num_q = queries.shape[0]
    out_scores = torch.full((num_q, k), NEG_INF, dtype=torch.float32)
    out_idx = torch.full((num_q, k), -1, dtype=torch.long)
    q_starts = range(0, num_q, query_block)
    bar = _progress_bar(len(q_starts) * max(1, -(-n_local // corpus_block)), progress, desc)
    for q0 in q_starts:
        q1 = min(q0 + query_block, num_q)
        qb = queries[q0:q1].to(device=device, dtype=torch.float32)
        run_s = torch.full((q1 - q0, k), NEG_INF, dtype=torch.float32, device=device)
        run_i = torch.full((q1 - q0, k), -1, dtype=torch.long, device=device)
        if pairs is not None:
            in_q = (pairs[0] >= q0) & (pairs[0] < q1)
            pq, pr = pairs[0][in_q], pairs[1][in_q]
        for c0 in range(0, n_local, corpus_block):
            c1 = min(c0 + corpus_block, n_local)
            tile = qb @ corpus[c0:c1].to(torch.float32).T  # [qb, cb], the only score tile alive
            if pairs is not None:
                in_c = (pr >= c0) & (pr < c1)
                tile[(pq[in_c] - q0).to(device), (pr[in_c] - c0).to(device)] = NEG_INF
            if threshold is not None:
                tile = tile.masked_fill(tile > threshold[q0:q1, None], NEG_INF)
            kk = min(k, c1 - c0)
            s, i = tile.topk(kk, dim=1)
            g = corpus_index[c0:c1][i]
            merged = merge_topk(torch.cat([run_s, s], 1), torch.cat([run_i, g], 1), k)
            run_s, run_i = merged.scores, merged.indices
            if bar is not None:
                bar.update(1)
        out_scores[q0:q1], out_idx[q0:q1] = run_s.cpu(), run_i.cpu()
    if bar is not None:
        bar.close()
    return TopK(out_scores, out_idx)


def sharded_topk(queries: torch.Tensor, local_corpus: torch.Tensor, local_index: torch.Tensor, num_corpus: int, k: int, **kwargs) -> TopK:
    """blockwise_topk over the rows this rank holds, then every rank's top k gathered and merged.

    Without an initialised process group (or with one rank) this is blockwise_topk. Every rank
    returns the same merged result. kwargs go to blockwise_topk (exclude, threshold, blocks...)."""
    local = blockwise_topk(queries, local_corpus, k, corpus_index=local_index, num_corpus=num_corpus, **kwargs)
    if not D.is_distributed():
        return local
    return merge_topk(D.gather_no_grad(local.scores, dim=1).cpu(), D.gather_no_grad(local.indices, dim=1).cpu(), k)


def _progress_bar(total: int, progress: bool | None, desc: str):
    """A tqdm bar when asked, or by default when stderr is a terminal (and on rank 0 only)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        if not D.is_main():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="tile")
    return None

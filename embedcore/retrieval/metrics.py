"""Full-corpus retrieval metrics: nDCG@k, MRR@k, Recall@k, MAP@k (and Accuracy@k).

Definitions follow sentence-transformers' InformationRetrievalEvaluator (which BEIR's numbers
agree with on binary qrels):

- a query counts when its qrels hold at least one document with relevance > 0; a counted query
  without any retrieved document scores 0 everywhere;
- a ranking is ordered by descending score, ties broken by ascending document id (as a string),
  so the numbers do not depend on the order candidates arrived in;
- Recall@k = relevant in the top k / number of relevant;
- MRR@k = 1 / rank of the first relevant document in the top k (0 when none);
- nDCG@k = DCG@k / IDCG@k with gain = relevance (linear, as pytrec_eval / BEIR) and discount
  1 / log2(rank + 1); with binary qrels this is exactly sentence-transformers' value;
- MAP@k = sum over relevant hits in the top k of precision at that rank, divided by
  min(k, number of relevant) (sentence-transformers; pytrec_eval divides by the number of
  relevant, which differs only for queries with more than k relevant documents).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")
_KINDS = ("ndcg", "mrr", "recall", "map", "accuracy", "precision")


def _parse(name: str) -> tuple[str, int]:
    kind, _, k = name.partition("@")
    if kind not in _KINDS or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown metric {name!r}; expected KIND@K with KIND in {_KINDS} and K >= 1")
    return kind, int(k)


def sort_ranking(hits: Iterable[tuple[str, float]]) -> list[str]:
    """Document ids by descending score, ties by ascending id."""
    return [doc for doc, _ in sorted(hits, key=lambda h: (-h[1], str(h[0])))]


def _dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def query_metrics(ranked_ids: Sequence[str], qrel: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Metrics of one query, given its ranked document ids (best first) and its qrels {doc_id: relevance}."""
    relevant = {d for d, r in qrel.items() if r > 0}
    if not relevant:
        raise ValueError("query_metrics: the query has no relevant document (relevance > 0) in its qrels")
    out = {}
    for name in names:
        kind, k = _parse(name)
        top = list(ranked_ids[:k])
        hits = [d in relevant for d in top]
        if kind == "recall":
            out[name] = sum(hits) / len(relevant)
        elif kind == "precision":
            out[name] = sum(hits) / k
        elif kind == "accuracy":
            out[name] = float(any(hits))
        elif kind == "mrr":
            out[name] = next((1.0 / (i + 1) for i, h in enumerate(hits) if h), 0.0)
        elif kind == "ndcg":
            gains = [float(qrel[d]) if h else 0.0 for d, h in zip(top, hits)]
            ideal = sorted((float(r) for r in qrel.values() if r > 0), reverse=True)[:k]
            out[name] = _dcg(gains) / _dcg(ideal)
        else:  # map
            found, total = 0, 0.0
            for i, h in enumerate(hits):
                if h:
                    found += 1
                    total += found / (i + 1)
            out[name] = total / min(k, len(relevant))
    return out


def compute_metrics(
    rankings: Mapping[str, Iterable[tuple[str, float]]],
    qrels: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels` that have a relevant document.

    rankings: {query_id: [(doc_id, score), ...]} (any order; sorted here by (-score, doc_id)).
    qrels: {query_id: {doc_id: relevance}}. Returns {metric: mean} plus "num_queries".
    """
    for name in metrics:
        _parse(name)
    counted = [q for q, rel in qrels.items() if any(r > 0 for r in rel.values())]
    if not counted:
        raise ValueError("compute_metrics: no query in the qrels has a relevant document (relevance > 0)")
    sums = dict.fromkeys(metrics, 0.0)
    for q in counted:
        per_query = query_metrics(sort_ranking(rankings.get(q, ())), qrels[q], metrics)
        for name, value in per_query.items():
            sums[name] += value
    result = {name: total / len(counted) for name, total in sums.items()}
    result["num_queries"] = len(counted)
    return result

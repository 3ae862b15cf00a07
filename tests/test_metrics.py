"""Retrieval metrics against small cases computed by hand."""
import math

import pytest

from embedcore.retrieval.metrics import compute_metrics, query_metrics, sort_ranking

L2 = math.log2


def test_single_query_hand_computed():
    # ranking d3 d1 d7 d2 ..., relevant {d1, d2}
    ranking = ["d3", "d1", "d7", "d2", "d9"]
    m = query_metrics(ranking, {"d1": 1, "d2": 1}, ["ndcg@10", "mrr@10", "recall@10", "recall@1", "map@100", "precision@2", "accuracy@1"])
    dcg = 1 / L2(3) + 1 / L2(5)
    idcg = 1 + 1 / L2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@10"] == 1.0 and m["recall@1"] == 0.0
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["precision@2"] == 0.5 and m["accuracy@1"] == 0.0


def test_cutoff_excludes_late_hits():
    ranking = [f"x{i}" for i in range(10)] + ["rel"]
    m = query_metrics(ranking, {"rel": 1}, ["ndcg@10", "mrr@10", "recall@10", "map@100"])
    assert m["ndcg@10"] == 0.0 and m["mrr@10"] == 0.0 and m["recall@10"] == 0.0
    assert m["map@100"] == pytest.approx(1 / 11)


def test_map_divides_by_min_k_relevant():
    # 3 relevant, k = 2, both top-2 are relevant -> AP = (1 + 1) / min(2, 3) = 1
    m = query_metrics(["a", "b", "c"], {"a": 1, "b": 1, "z": 1}, ["map@2"])
    assert m["map@2"] == pytest.approx(1.0)


def test_graded_ndcg():
    m = query_metrics(["b", "a"], {"a": 2, "b": 1}, ["ndcg@10"])
    assert m["ndcg@10"] == pytest.approx((1 + 2 / L2(3)) / (2 + 1 / L2(3)))


def test_mean_over_queries_ties_and_missing():
    rankings = {
        # equal scores: ties sorted by id, so "a" (relevant) ranks before "b"
        "q1": [("b", 0.5), ("a", 0.5)],
        "q2": [("c", 0.9), ("d", 0.1)],
        # q3 has no ranking at all -> zeros, still counted
    }
    qrels = {"q1": {"a": 1}, "q2": {"d": 1}, "q3": {"e": 1}, "q4": {"f": 0}}  # q4 not counted
    m = compute_metrics(rankings, qrels, ["mrr@10", "recall@1"])
    assert m["num_queries"] == 3
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)


def test_sort_ranking_order():
    assert sort_ranking([("z", 0.1), ("y", 0.3), ("x", 0.3)]) == ["x", "y", "z"]


def test_bad_metric_name_and_empty_qrels():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics({}, {"q": {"a": 1}}, ["hits@10"])
    with pytest.raises(ValueError, match="no query"):
        compute_metrics({}, {"q": {"a": 0}})

"""Blockwise / sharded top-k against the full score matrix."""
import pytest
import torch

from embedcore.retrieval.topk import NEG_INF, blockwise_topk, margin_threshold, merge_topk


def _data(q=7, n=33, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(n, d, generator=g)


def _full_reference(q, c, k, exclude=None, threshold=None):
    s = q @ c.T
    if exclude is not None:
        for i, rows in enumerate(exclude):
            s[i, list(rows)] = NEG_INF
    if threshold is not None:
        s = s.masked_fill(s > threshold[:, None], NEG_INF)
    vals, idx = s.sort(dim=1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    return vals, torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)


@pytest.mark.parametrize("query_block,corpus_block", [(1, 1), (3, 5), (2, 32), (64, 64)])
def test_blockwise_equals_full_matrix(query_block, corpus_block):
    q, c = _data()
    exclude = [[0, 5], [], [32], [1, 2, 3], [], [7], [10]]
    ref_s, ref_i = _full_reference(q, c, 6, exclude)
    got = blockwise_topk(q, c, 6, exclude=exclude, query_block=query_block, corpus_block=corpus_block)
    assert torch.equal(got.indices, ref_i)
    torch.testing.assert_close(got.scores, ref_s, rtol=1e-6, atol=1e-6)


def test_sharded_merge_equals_full_matrix():
    q, c = _data(n=40)
    ref_s, ref_i = _full_reference(q, c, 9)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    parts = [perm[:17], perm[17:]]  # two "ranks" holding arbitrary rows
    locals_ = [blockwise_topk(q, c[p], 9, corpus_index=p, num_corpus=40, corpus_block=4) for p in parts]
    merged = merge_topk(torch.cat([t.scores for t in locals_], 1), torch.cat([t.indices for t in locals_], 1), 9)
    assert torch.equal(merged.indices, ref_i)
    torch.testing.assert_close(merged.scores, ref_s)


@pytest.mark.parametrize("margin_type,margin", [("perc", 0.95), ("abs", 0.1)])
def test_margin_filter(margin_type, margin):
    q, c = _data(n=33)
    q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    positives = [[i] for i in range(q.shape[0])]
    min_pos = torch.stack([q[i] @ c[i] for i in range(q.shape[0])])
    thr = margin_threshold(min_pos, margin, margin_type)
    expected = min_pos * margin if margin_type == "perc" else min_pos - margin
    torch.testing.assert_close(thr, expected)
    got = blockwise_topk(q, c, 33, exclude=positives, threshold=thr, corpus_block=4)
    ref_s, ref_i = _full_reference(q, c, 33, positives, thr)
    assert torch.equal(got.indices, ref_i)
    real = got.indices >= 0
    assert (got.scores[real] <= thr[:, None].expand_as(real)[real]).all()
    assert not any(i in got.indices[i].tolist() for i in range(q.shape[0]))  # positives never returned


def test_margin_threshold_without_positive_and_bad_type():
    thr = margin_threshold(torch.tensor([float("inf"), 0.5]), 0.9, "perc")
    assert torch.isinf(thr[0]) and thr[1] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="perc' or 'abs"):
        margin_threshold(torch.tensor([0.5]), 0.9, "pct")


def test_rank_window_skips_best():
    q, c = _data()
    full = blockwise_topk(q, c, 10, corpus_block=7)
    win = full.window(3, 4)
    assert torch.equal(win.indices, full.indices[:, 3:7])
    ref_s, ref_i = _full_reference(q, c, 7)
    assert torch.equal(win.indices, ref_i[:, 3:7])
    with pytest.raises(ValueError):
        full.window(-1, 2)


def test_too_few_candidates_pads_with_minus_one():
    q, c = _data(q=3, n=5)
    exclude = [[0, 1, 2, 3], [], [0, 1, 2, 3, 4]]
    got = blockwise_topk(q, c, 4, exclude=exclude, corpus_block=2)
    assert got.counts().tolist() == [1, 4, 0]
    assert got.indices[0, 1:].tolist() == [-1, -1, -1] and got.indices[0, 0] == 4
    assert torch.isneginf(got.scores[got.indices < 0]).all()
    assert torch.isfinite(got.scores[got.indices >= 0]).all()
    # k larger than the corpus
    big = blockwise_topk(q, c, 8)
    assert big.counts().tolist() == [5, 5, 5]


def test_ties_broken_by_lowest_index():
    q = torch.ones(1, 2)
    c = torch.ones(6, 2)  # all scores equal
    got = blockwise_topk(q, c, 3, corpus_block=2)
    assert got.indices.tolist() == [[0, 1, 2]]


def test_bad_shapes():
    with pytest.raises(ValueError, match="queries"):
        blockwise_topk(torch.ones(2, 3), torch.ones(4, 5), 2)
    with pytest.raises(ValueError, match="k must be"):
        blockwise_topk(torch.ones(2, 3), torch.ones(4, 3), 0)

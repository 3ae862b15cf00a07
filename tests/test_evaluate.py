"""Full-corpus evaluation against sentence-transformers' InformationRetrievalEvaluator."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from retrieval_toy import DOCS, QUERIES, write_beir, write_corpus_id_json  # noqa: F401

from embedcore.data.errors import DataError
from embedcore.evaluate import evaluate_model, read_beir

pytestmark = pytest.mark.slow

KEYS = ["ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"]


@pytest.mark.parametrize("dim", [None, 24])
def test_beir_matches_sentence_transformers(tmp_path, minilm_path, dim):
    """dim: a prefix of the embedding (--dim), against sentence-transformers' truncate_dim."""
    st = importlib.import_module("sentence_transformers")  # a dev dependency: missing must fail, not skip
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    folder = write_beir(str(tmp_path))
    ours = evaluate_model(minilm_path, folder, "test", batch_size=5, corpus_block=7, dim=dim)
    assert ours["num_queries"] == len(QUERIES) and ours["num_corpus"] == len(DOCS)

    task = read_beir(folder, "test")
    model = st.SentenceTransformer(minilm_path, device="cpu")
    evaluator = InformationRetrievalEvaluator(
        queries=dict(zip(task.query_ids, task.queries)), corpus=dict(zip(task.doc_ids, task.docs)),
        relevant_docs={q: {d for d, r in rel.items() if r > 0} for q, rel in task.qrels.items()},
        precision_recall_at_k=[10, 100], write_csv=False, truncate_dim=dim)
    ref = evaluator(model)
    if dim is not None:
        full = evaluate_model(minilm_path, folder, "test", batch_size=5)
        assert ours["dim"] == dim and ours["ndcg@10"] != full["ndcg@10"], "the prefix must change the ranking"
    for key in KEYS:
        assert ours[key] == pytest.approx(ref[f"cosine_{key}"], abs=1e-4), key
    # the task is not trivial: the metrics are not all perfect
    assert ours["ndcg@10"] < 1.0 and ours["recall@100"] == 1.0


def test_own_format_and_cli(tmp_path, minilm_path):
    data = write_corpus_id_json(str(tmp_path))
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "embedcore.evaluate", "--model", minilm_path, "--data", data,
                           "--output", str(out)], capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ndcg@10" in proc.stdout
    result = json.loads(out.read_text())
    beir = evaluate_model(minilm_path, write_beir(str(tmp_path)), "test")
    # same queries, corpus (titles aside) and qrels: close, and every metric present
    assert result["num_queries"] == len(QUERIES) and result["num_corpus"] == len(DOCS)
    for key in KEYS:
        assert 0.0 < result[key] <= 1.0
    assert result["recall@100"] == beir["recall@100"] == 1.0


def test_bad_data(tmp_path, minilm_path):
    folder = write_beir(str(tmp_path))
    with pytest.raises(DataError, match="split 'dev' not found"):
        evaluate_model(minilm_path, folder, "dev")
    with pytest.raises(DataError, match="not found"):
        evaluate_model(minilm_path, str(tmp_path / "nope"), "test")
    open(os.path.join(folder, "corpus.jsonl"), "w").close()
    with pytest.raises(DataError, match="corpus is empty"):
        evaluate_model(minilm_path, folder, "test")


def test_exported_prefixes_match_sentence_transformers_prompts(tmp_path, minilm_path):
    """Our export with prefixes: our query/passage embeddings equal ST's encode_query / encode_document."""
    st = importlib.import_module("sentence_transformers")  # a dev dependency: missing must fail, not skip
    import torch

    from embedcore.models.backbone import load_tokenizer
    from embedcore.models.biencoder import Biencoder
    from embedcore.retrieval.encode import encode_texts
    from embedcore.retrieval.model import RetrievalModel

    out = str(tmp_path / "export")
    Biencoder.from_pretrained(minilm_path).save_pretrained(out, load_tokenizer(minilm_path), query_prefix="query:",
                                                           passage_prefix="passage:")
    ours = RetrievalModel.load(out, device="cpu")
    assert (ours.query_prefix, ours.passage_prefix) == ("query:", "passage:")
    texts = [q for _, q, _ in QUERIES[:5]]
    ref_model = st.SentenceTransformer(out, device="cpu")
    ref_q = ref_model.encode_query(texts, convert_to_tensor=True)
    ref_d = ref_model.encode_document(texts, convert_to_tensor=True)
    _, q = encode_texts(ours, texts, kind="query", prefix=ours.query_prefix, batch_size=2)
    _, d = encode_texts(ours, texts, kind="passage", prefix=ours.passage_prefix, batch_size=2)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(d, ref_d, atol=1e-5, rtol=0)
    _, bare = encode_texts(ours, texts, kind="query", prefix=None)
    assert (bare - ref_q).abs().max() > 1e-2  # the prefix matters, so the check above can fail

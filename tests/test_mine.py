"""Hard-negative mining end to end with the packaged all-MiniLM-L6-v2 on a tiny corpus."""
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from retrieval_toy import DOCS, QUERIES, write_corpus_dir, write_corpus_id_json  # noqa: F401

from embedcore.data.errors import DataError
from embedcore.data.formats import load_examples
from embedcore.mine import load_mining_config, main, run_mining

pytestmark = pytest.mark.slow


def _cfg(model, inp, out, *extra):
    args = ["--mining.model_name_or_path", model, "--mining.train_qa_file_path", inp,
            "--mining.train_file_output_path", out, "--mining.hard_negatives_to_mine", "4",
            "--mining.mining_batch_size", "5", "--mining.scoring_corpus_block", "7", *extra]
    return load_mining_config(None, args)


@pytest.fixture(scope="module")
def reference_scores(minilm_path):
    """Full score matrix from sentence-transformers' own encode (queries x docs)."""
    st = importlib.import_module("sentence_transformers")  # a dev dependency: missing must fail, not skip
    model = st.SentenceTransformer(minilm_path, device="cpu")
    q = model.encode([q for _, q, _ in QUERIES], convert_to_tensor=True)
    d = model.encode(DOCS, convert_to_tensor=True)
    return (q @ d.T).cpu()


def _brute_force(scores, qi, pos, n, margin=0.95, kind="perc", skip=0):
    row = scores[qi].clone()
    min_pos = min(row[int(p[1:])].item() for p in pos)
    thr = margin * min_pos if kind == "perc" else min_pos - margin
    cands = [(row[j].item(), j) for j in range(len(DOCS)) if f"d{j}" not in pos and row[j].item() <= thr]
    cands.sort(key=lambda c: (-c[0], c[1]))
    return [f"d{j}" for _, j in cands[skip:skip + n]]


def test_mine_corpus_id_json(tmp_path, minilm_path, reference_scores):
    inp = write_corpus_id_json(str(tmp_path))
    out = str(tmp_path / "out" / "mined.json")
    doc = run_mining(_cfg(minilm_path, inp, out))
    written = json.loads(open(out).read())
    assert written["data"] == doc["data"]
    assert written["mining"]["args"]["hard_negatives_to_mine"] == 4
    assert written["mining"]["summary"]["queries_with_fewer_negatives"] == 0
    for qi, ((qid, _, pos), row) in enumerate(zip(QUERIES, written["data"])):
        assert row["question_id"] == qid and [p["id"] for p in row["pos_doc"]] == pos
        neg_ids = [n["id"] for n in row["neg_doc"]]
        assert neg_ids == _brute_force(reference_scores, qi, pos, 4)
        for n in row["neg_doc"] + row["pos_doc"]:
            assert math.isfinite(n["score"])
            assert n["score"] == pytest.approx(reference_scores[qi, int(n["id"][1:])].item(), abs=1e-5)
        min_pos = min(p["score"] for p in row["pos_doc"])
        assert all(n["score"] <= 0.95 * min_pos for n in row["neg_doc"])
    # the output trains: the loader reads it, with the mined negatives
    ex = load_examples([out])
    assert len(ex) == len(QUERIES) and all(len(e.negatives) == 4 for e in ex)


def test_abs_margin_rank_window_and_too_few(tmp_path, minilm_path, reference_scores):
    inp = write_corpus_id_json(str(tmp_path))
    out = str(tmp_path / "abs.json")
    doc = run_mining(_cfg(minilm_path, inp, out, "--mining.hard_neg_margin_type", "abs",
                          "--mining.hard_neg_margin", "0.1", "--mining.hard_neg_skip_top_k", "2"))
    for qi, ((_, _, pos), row) in enumerate(zip(QUERIES, doc["data"])):
        assert [n["id"] for n in row["neg_doc"]] == _brute_force(reference_scores, qi, pos, 4, 0.1, "abs", skip=2)
    # more negatives asked than the corpus can give: fewer, counted, never -inf
    doc = run_mining(_cfg(minilm_path, inp, str(tmp_path / "many.json"), "--mining.hard_negatives_to_mine", "40"))
    summary = doc["mining"]["summary"]
    assert summary["queries_with_fewer_negatives"] == len(QUERIES)
    for qi, ((_, _, pos), row) in enumerate(zip(QUERIES, doc["data"])):
        assert 0 < len(row["neg_doc"]) < len(DOCS) - len(pos) + 1
        assert [n["id"] for n in row["neg_doc"]] == _brute_force(reference_scores, qi, pos, 40)
        assert all(math.isfinite(n["score"]) for n in row["neg_doc"])


def test_inline_jsonl_with_corpus(tmp_path, minilm_path, reference_scores):
    corpus = write_corpus_dir(str(tmp_path))
    inp = tmp_path / "inline.jsonl"
    with open(inp, "w") as f:
        for qid, q, pos in QUERIES[:4]:
            f.write(json.dumps({"question_id": qid, "query": q, "pos_doc": [DOCS[int(p[1:])] for p in pos]}) + "\n")
    out = str(tmp_path / "inline_out.json")
    doc = run_mining(_cfg(minilm_path, str(inp), out, "--mining.corpus_path", corpus))
    assert [r["corpus_id"] for r in doc["data"]] == ["toy"] * 4
    for qi, ((_, _, pos), row) in enumerate(zip(QUERIES[:4], doc["data"])):
        assert [p["id"] for p in row["pos_doc"]] == pos
        assert [n["id"] for n in row["neg_doc"]] == _brute_force(reference_scores, qi, pos, 4)
    assert len(load_examples([out])) == 4
    # a positive text that is not in the corpus: error naming the line
    with open(inp, "a") as f:
        f.write(json.dumps({"query": "x?", "pos_doc": "not a document of the corpus"}) + "\n")
    with pytest.raises(DataError, match=r"inline.jsonl:5: pos_doc\[0\] is not a document"):
        run_mining(_cfg(minilm_path, str(inp), out, "--mining.corpus_path", corpus))
    with pytest.raises(DataError, match="mining.corpus_path"):
        run_mining(_cfg(minilm_path, str(inp), out))


def test_prefix_joined_with_a_space(minilm_path):
    from embedcore.models.backbone import load_tokenizer
    from embedcore.retrieval.encode import tokenize

    tok = load_tokenizer(minilm_path)
    got = tokenize(tok, ["What is Python?"], 64, "query:")
    want = tok(["query: What is Python?"], return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])


def test_bad_input_messages(tmp_path, minilm_path, capsys):
    inp = write_corpus_id_json(str(tmp_path))
    out = str(tmp_path / "x.json")
    base = ["--mining.model_name_or_path", minilm_path, "--mining.train_file_output_path", out]
    # an id that is not in the corpus
    doc = json.load(open(inp))
    doc["data"][2]["pos_doc"] = [{"id": "d999"}]
    bad_ids = tmp_path / "bad_ids.json"
    bad_ids.write_text(json.dumps(doc))
    assert main([*base, "--mining.train_qa_file_path", str(bad_ids)]) == 2
    assert "data[2]" in capsys.readouterr().err
    # a missing corpus directory
    doc = json.load(open(inp))
    doc["corpus"] = [{"path": "no_such_corpus"}]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(doc))
    assert main([*base, "--mining.train_qa_file_path", str(missing)]) == 2
    assert "no_such_corpus" in capsys.readouterr().err
    # an empty corpus
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    inp_empty = write_corpus_id_json(str(empty_root))
    open(os.path.join(empty_root, "corpus_toy", "train.jsonl"), "w").close()
    assert main([*base, "--mining.train_qa_file_path", inp_empty]) == 2
    assert "empty" in capsys.readouterr().err
    # an unreadable model
    broken = tmp_path / "broken_model"
    shutil.copytree(minilm_path, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    args = ["--mining.model_name_or_path", str(broken), "--mining.train_file_output_path", out,
            "--mining.train_qa_file_path", inp]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "mining.model_name_or_path" in err and "broken_model" in err
    # an unknown key
    assert main([*base, "--mining.train_qa_file_path", inp, "--mining.nope", "1"]) == 2
    assert "mining.nope: unknown key" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_torchrun_two_ranks_same_output(tmp_path, minilm_path):
    inp = write_corpus_id_json(str(tmp_path))
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    args = ["--mining.model_name_or_path", minilm_path, "--mining.train_qa_file_path", inp,
            "--mining.hard_negatives_to_mine", "5", "--mining.mining_batch_size", "4",
            "--mining.scoring_corpus_block", "6"]
    run_mining(load_mining_config(None, [*args, "--mining.train_file_output_path", one]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "embedcore.mine", *args, "--mining.train_file_output_path", two],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.load(open(one)), json.load(open(two))
    assert b["mining"]["args"]["world_size"] == 2
    for ra, rb in zip(a["data"], b["data"]):
        assert [n["id"] for n in ra["neg_doc"]] == [n["id"] for n in rb["neg_doc"]]
        for x, y in zip(ra["neg_doc"] + ra["pos_doc"], rb["neg_doc"] + rb["pos_doc"]):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)


def test_example_config_loads_with_overrides():
    cfg = load_mining_config(os.path.join(os.path.dirname(__file__), "..", "examples", "mining.yaml"),
                             ["--mining.hard_neg_margin=0.9", "--mining.query_prefix", "query:"])
    assert cfg.hard_negatives_to_mine == 20 and cfg.hard_neg_margin == 0.9 and cfg.query_prefix == "query:"
    with pytest.raises(ValueError, match="hard_neg_margin_type"):
        load_mining_config(None, ["--mining.model_name_or_path", "m", "--mining.train_qa_file_path", "i",
                                  "--mining.train_file_output_path", "o", "--mining.hard_neg_margin_type", "pct"])

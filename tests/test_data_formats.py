"""Readers for inline JSONL and corpus-ID JSON: both formats, several files, every bad-data
case named by file and line (or key), skip_bad counts."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedcore.data.formats import DataError, load_corpus, load_examples
from embedcore.data.ids import passage_uid_to_int64, text_uid


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def make_corpus(dirpath, corpus_id, docs, fmt="parquet", meta=True, extra_meta=None):
    os.makedirs(dirpath, exist_ok=True)
    if meta:
        with open(os.path.join(dirpath, "merlin_metadata.json"), "w") as f:
            json.dump({"class": "TextQADataset", "corpus_id": corpus_id, **(extra_meta or {})}, f)
    ids, texts = list(docs), list(docs.values())
    if fmt == "parquet":
        pq.write_table(pa.table({"id": ids, "text": texts}), os.path.join(dirpath, "train.parquet"))
    else:
        write_jsonl(os.path.join(dirpath, "train.jsonl"), [{"id": i, "text": t} for i, t in docs.items()])
    return str(dirpath)


def write_corpus_json(path, corpus_paths, data):
    with open(path, "w") as f:
        json.dump({"corpus": [{"path": p} for p in corpus_paths], "data": data}, f, indent=1)
    return str(path)


INLINE = [
    {"query": "Explain transformers", "pos_doc": "Transformers are networks.", "neg_doc": ["RNNs are...", "CNNs are..."]},
    {"question": "What is Python?", "pos_doc": ["A programming language."], "neg_doc": "A snake.", "id": 17},
    {"query": "dict form", "pos_doc": {"text": "P as dict"}, "neg_doc": [{"text": "N1"}, "N2"], "question_id": "q9"},
]


def test_inline_jsonl_all_value_shapes(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", INLINE)
    es = load_examples([p])
    assert len(es) == 3 and es.skipped == {} and es.corpora == {}
    e0, e1, e2 = es
    assert e0.query == "Explain transformers" and [x.text for x in e0.positives] == ["Transformers are networks."]
    assert [x.text for x in e0.negatives] == ["RNNs are...", "CNNs are..."]
    assert e0.qid == "a.jsonl:1" and e0.source == f"{p}:1"
    assert e1.query == "What is Python?" and e1.qid == "17" and [x.text for x in e1.negatives] == ["A snake."]
    assert e2.qid == "q9" and e2.positives[0].text == "P as dict" and [x.text for x in e2.negatives] == ["N1", "N2"]
    assert e0.positives[0].uid == text_uid("Transformers are networks.")
    assert e0.positives[0].uid.startswith("text:") and e0.corpus_id is None and e0.positives[0].doc_id is None


def test_identical_inline_text_same_uid_and_int64(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"query": "q1", "pos_doc": "same", "neg_doc": "x"},
                                           {"query": "q2", "pos_doc": "other", "neg_doc": "same"}])
    e0, e1 = load_examples([p])
    assert e0.positives[0].uid == e1.negatives[0].uid
    assert passage_uid_to_int64(e0.positives[0].uid) == passage_uid_to_int64(e1.negatives[0].uid)
    assert passage_uid_to_int64(e0.positives[0].uid) != passage_uid_to_int64(e1.positives[0].uid)


def test_ids_stable_value():
    # Pinned: a change would silently break resumed runs and cross-process agreement.
    assert passage_uid_to_int64("wiki:d_1") == passage_uid_to_int64("wiki:d_1")
    import hashlib
    expect = int.from_bytes(hashlib.blake2b(b"wiki:d_1", digest_size=8).digest(), "little", signed=True)
    assert passage_uid_to_int64("wiki:d_1") == expect
    assert -(2 ** 63) <= expect < 2 ** 63


def test_negative_equal_to_positive_is_dropped_and_counted(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "pos_doc": "P", "neg_doc": ["P", "N"]}])
    es = load_examples([p])
    assert [n.text for n in es[0].negatives] == ["N"] and es.dropped_negatives == 1
    assert "dropped 1" in es.summary()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_corpus_id_json(tmp_path, fmt):
    cdir = make_corpus(tmp_path / "wiki", "wiki_corpus", {"d_123": "Transformers...", "d_456": "RNNs", "789": "CNNs"},
                       fmt=fmt, extra_meta={"query_instruction": "Q:", "passage_instruction": "P:"})
    data = [{"question_id": "q_001", "question": "Explain transformers", "corpus_id": "wiki_corpus",
             "pos_doc": [{"id": "d_123"}], "neg_doc": [{"id": "d_456", "score": 0.3}, 789]}]
    p = write_corpus_json(tmp_path / "train.json", ["wiki"], data)  # relative to the JSON file
    es = load_examples([p])
    (ex,) = es
    assert ex.qid == "q_001" and ex.query == "Explain transformers" and ex.corpus_id == "wiki_corpus"
    assert [(x.text, x.uid) for x in ex.positives] == [("Transformers...", "wiki_corpus:d_123")]
    assert [x.uid for x in ex.negatives] == ["wiki_corpus:d_456", "wiki_corpus:789"]
    assert [x.doc_id for x in ex.negatives] == ["d_456", "789"] and ex.positives[0].doc_id == "d_123"
    c = es.corpus("wiki_corpus")
    assert c["d_456"] == "RNNs" and c[789] == "CNNs" and len(c) == 3 and c.path == os.path.realpath(cdir)
    assert c.query_instruction == "Q:" and c.passage_instruction == "P:"
    with pytest.raises(DataError, match="unknown corpus id 'nope'"):
        es.corpus("nope")


def test_load_corpus_standalone(tmp_path):
    make_corpus(tmp_path / "c", "cc", {1: "one", 2: "two"})
    c = load_corpus(str(tmp_path / "c"))
    assert c.corpus_id == "cc" and dict(c) == {"1": "one", "2": "two"}
    f = write_jsonl(tmp_path / "bare.jsonl", [{"id": "a", "text": "A"}])
    c2 = load_corpus(f)
    assert c2.corpus_id == "bare" and c2["a"] == "A"


def test_several_files_combine_and_share_corpus(tmp_path):
    make_corpus(tmp_path / "wiki", "wiki", {"a": "A", "b": "B", "c": "C"})
    d1 = write_corpus_json(tmp_path / "one.json", ["wiki"],
                           [{"question": "q1", "corpus_id": "wiki", "pos_doc": ["a"], "neg_doc": ["b"]}])
    sub = tmp_path / "sub"
    sub.mkdir()
    d2 = write_corpus_json(sub / "two.json", ["../wiki"],  # same corpus through another relative path
                           [{"question": "q2", "corpus_id": "wiki", "pos_doc": ["c"], "neg_doc": ["a"]}])
    inline = write_jsonl(tmp_path / "x.jsonl", INLINE[:1])
    es = load_examples([d1, inline, d2])
    assert [e.query for e in es] == ["q1", "Explain transformers", "q2"]
    assert list(es.corpora) == ["wiki"] and len(es.files) == 3
    assert "3 examples from 3 files" in es.summary()


def test_same_corpus_id_different_paths_is_error(tmp_path):
    make_corpus(tmp_path / "w1", "wiki", {"a": "A"})
    make_corpus(tmp_path / "w2", "wiki", {"a": "A2"})
    d1 = write_corpus_json(tmp_path / "one.json", ["w1"], [{"question": "q", "corpus_id": "wiki", "pos_doc": ["a"]}])
    d2 = write_corpus_json(tmp_path / "two.json", ["w2"], [{"question": "q", "corpus_id": "wiki", "pos_doc": ["a"]}])
    with pytest.raises(DataError, match=r"two\.json: corpus\[0\]: corpus_id 'wiki' is defined by two different paths"):
        load_examples([d1, d2], skip_bad=True)  # file/corpus-level errors raise even when skipping


# ---- bad inline lines: (line content, reason, message fragment) ---------------------------
BAD_INLINE = [
    ('{"query": "q", "pos_doc": "p"', "malformed_json", "malformed JSON line"),
    ('{"pos_doc": "p", "neg_doc": "n"}', "missing_query", "missing query"),
    ('{"query": "  ", "pos_doc": "p"}', "missing_query", "missing query"),
    ('{"query": "q", "pos_doc": [], "neg_doc": "n"}', "empty_positive", "empty positive"),
    ('{"query": "q", "neg_doc": "n"}', "empty_positive", "empty positive"),
    ('{"query": "q", "pos_doc": ""}', "empty_positive", "pos_doc[0]"),
    ('{"query": "q", "pos_doc": [{"id": "d1"}]}', "empty_positive", "needs corpus-ID JSON"),
    ('{"query": "q", "pos_doc": "p", "neg_doc": [3]}', "bad_negative", "neg_doc[0]"),
    ('["not", "an", "object"]', "malformed_json", "expected a JSON object"),
]


@pytest.mark.parametrize("line,reason,fragment", BAD_INLINE)
def test_bad_inline_line_names_file_and_line(tmp_path, line, reason, fragment):
    good = json.dumps(INLINE[0])
    p = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, line, good])  # bad line is line 4
    with pytest.raises(DataError) as ei:
        load_examples([p])
    assert f"{p}:4:" in str(ei.value) and fragment in str(ei.value) and ei.value.reason == reason
    es = load_examples([p], skip_bad=True)
    assert len(es) == 3 and es.skipped == {reason: 1}
    assert f"skipped 1 bad ({reason}: 1)" in es.summary()
    assert fragment in es.skip_messages[reason]


def test_skip_bad_counts_several_reasons(tmp_path):
    good = json.dumps(INLINE[0])
    rows = [good, BAD_INLINE[0][0], BAD_INLINE[3][0], BAD_INLINE[4][0], BAD_INLINE[1][0], good]
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    es = load_examples([p], skip_bad=True)
    assert len(es) == 2 and es.skipped == {"empty_positive": 2, "malformed_json": 1, "missing_query": 1}
    assert "skipped 4 bad" in es.summary()


def test_all_bad_is_error_even_when_skipping(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [BAD_INLINE[1][0]])
    with pytest.raises(DataError, match="no usable examples.*missing_query: 1"):
        load_examples([p], skip_bad=True)


BAD_CORPUS_ROWS = [
    ({"question": "q", "corpus_id": "nope", "pos_doc": ["a"]}, "unknown_corpus_id", "unknown corpus id 'nope'"),
    ({"question": "q", "pos_doc": ["a"]}, "unknown_corpus_id", "unknown corpus id None"),
    ({"question": "q", "corpus_id": "wiki", "pos_doc": ["zzz"]}, "unknown_doc_id", "pos_doc id 'zzz' is not in corpus"),
    ({"question": "q", "corpus_id": "wiki", "pos_doc": ["a"], "neg_doc": [{"id": "q"}]}, "unknown_doc_id",
     "neg_doc id 'q' is not in corpus 'wiki'"),
    ({"question": "q", "corpus_id": "wiki", "pos_doc": []}, "empty_positive", "empty positive"),
    ({"question_id": "x7", "corpus_id": "wiki", "pos_doc": ["a"]}, "missing_query", "missing query"),
    ({"question": "q", "corpus_id": "wiki", "pos_doc": [{"score": 1}]}, "empty_positive", "pos_doc[0]"),
]


@pytest.mark.parametrize("row,reason,fragment", BAD_CORPUS_ROWS)
def test_bad_corpus_row_names_file_and_key(tmp_path, row, reason, fragment):
    make_corpus(tmp_path / "wiki", "wiki", {"a": "A", "b": "B"})
    good = {"question": "ok", "corpus_id": "wiki", "pos_doc": ["a"], "neg_doc": ["b"]}
    p = write_corpus_json(tmp_path / "t.json", ["wiki"], [good, good, row])
    with pytest.raises(DataError) as ei:
        load_examples([p])
    msg = str(ei.value)
    assert f"{p}: data[2]" in msg and fragment in msg and ei.value.reason == reason
    if "question_id" in row:
        assert "question_id 'x7'" in msg
    es = load_examples([p], skip_bad=True)
    assert len(es) == 2 and es.skipped == {reason: 1}


def test_missing_metadata_is_error(tmp_path):
    make_corpus(tmp_path / "wiki", "wiki", {"a": "A"}, meta=False)
    p = write_corpus_json(tmp_path / "t.json", ["wiki"], [{"question": "q", "corpus_id": "wiki", "pos_doc": ["a"]}])
    for skip in (False, True):
        with pytest.raises(DataError, match=r"t\.json: corpus\[0\]: .*wiki: corpus directory has no merlin_metadata\.json"):
            load_examples([p], skip_bad=skip)


def test_missing_corpus_dir_and_table(tmp_path):
    p = write_corpus_json(tmp_path / "t.json", ["nowhere"], [{"question": "q", "corpus_id": "w", "pos_doc": ["a"]}])
    with pytest.raises(DataError, match=r"t\.json: corpus\[0\]: corpus directory 'nowhere' not found"):
        load_examples([p])
    d = tmp_path / "empty"
    d.mkdir()
    (d / "merlin_metadata.json").write_text('{"class": "TextQADataset", "corpus_id": "e"}')
    with pytest.raises(DataError, match="expected one corpus table"):
        load_corpus(str(d))


def test_corpus_table_errors(tmp_path):
    d = tmp_path / "c"
    make_corpus(d, "c", {"a": "A"})
    pq.write_table(pa.table({"id": ["a"], "body": ["A"]}), str(d / "train.parquet"))
    with pytest.raises(DataError, match=r"train\.parquet: corpus table lacks column\(s\) \['text'\]"):
        load_corpus(str(d))
    f = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "A"}, {"id": "a", "text": "B"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: document id 'a' appears twice"):
        load_corpus(f)


def test_file_not_found_and_unknown_format(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found") as ei:
        load_examples([missing], skip_bad=True)
    assert ei.value.reason == "file_not_found"
    other = tmp_path / "data.csv"
    other.write_text("query,pos\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown data file format"):
        load_examples([str(other)])
    with pytest.raises(DataError, match="no data files"):
        load_examples([])


def test_json_variants(tmp_path):
    # A .json file holding JSON lines is read as inline JSONL, with line numbers.
    p = write_jsonl(tmp_path / "lines.json", [json.dumps(INLINE[0]), json.dumps(INLINE[1])])
    assert len(load_examples([p])) == 2
    bad = tmp_path / "broken.json"
    bad.write_text('{"corpus": [{"path": "x"}],\n "data": [\n')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON"):
        load_examples([str(bad)], skip_bad=True)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(DataError, match="got a JSON list"):
        load_examples([str(lst)])


EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_shipped_stdlib_data_loads():
    train = load_examples([os.path.join(EXAMPLES_DIR, "data", "stdlib_train.jsonl")])
    val = load_examples([os.path.join(EXAMPLES_DIR, "data", "stdlib_val.jsonl")])
    assert len(train) == 1500 and len(val) == 200 and train.skipped == {} and val.skipped == {}
    assert all(len(e.negatives) >= 3 for e in [*train, *val])
    assert not {e.qid for e in train} & {e.qid for e in val}
    assert not {e.positives[0].uid for e in train} & {e.positives[0].uid for e in val}


def test_docstring_generator_is_deterministic(tmp_path):
    import sys
    sys.path.insert(0, EXAMPLES_DIR)
    try:
        import make_docstring_data
    finally:
        sys.path.remove(EXAMPLES_DIR)
    for out in ("a", "b"):
        make_docstring_data.main(["--out", str(tmp_path / out), "--train", "40", "--val", "10", "--seed", "3"])
    for name in ("stdlib_train.jsonl", "stdlib_val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    es = load_examples([str(tmp_path / "a" / "stdlib_train.jsonl")])
    assert len(es) == 40 and all(len(e.negatives) == 3 for e in es)
    assert all(e.positives[0].text.startswith(e.qid.removeprefix("stdlib:") + ": ") for e in es)

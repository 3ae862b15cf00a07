"""BiencoderCollator and encode_texts: prefix spacing, right truncation, pad multiple, a
tokenizer without a pad token, left/right padding, passage_ids for identical text."""
import pytest
import torch

from embedcore.data.collator import BiencoderCollator, encode_texts, pad_rows, prepare_tokenizer, with_prefix
from embedcore.data.ids import passage_uid_to_int64, text_uid
from tokenizer_fixture import bpe_tokenizer, word_tokenizer


def item(q, passages, qid="q"):
    return {"query": q, "passages": passages, "passage_uids": [text_uid(p) for p in passages], "qid": qid}


BATCH = [
    item("return the number of items", ["return a list of parts", "the lazy dog", "open a file"], "a"),
    item("what is python", ["a programming language", "a snake", "the lazy dog"], "b"),
]


def tokens(tok, ids, mask):
    return tok.convert_ids_to_tokens([i for i, m in zip(ids.tolist(), mask.tolist()) if m])


def test_layout_shapes_and_order():
    tok = word_tokenizer()
    out = BiencoderCollator(tok)(BATCH)
    assert set(out) == {"q_input_ids", "q_attention_mask", "p_input_ids", "p_attention_mask", "passage_ids"}
    assert out["q_input_ids"].shape == out["q_attention_mask"].shape and out["q_input_ids"].shape[0] == 2
    assert out["p_input_ids"].shape[0] == 6 and out["passage_ids"].shape == (6,)
    assert all(v.dtype == torch.int64 for v in out.values())
    # query i's passages are rows i*n .. i*n+n-1, positive first
    assert tokens(tok, out["p_input_ids"][3], out["p_attention_mask"][3]) == ["[CLS]", "a", "programming", "language", "[SEP]"]
    assert tokens(tok, out["p_input_ids"][2], out["p_attention_mask"][2]) == ["[CLS]", "open", "a", "file", "[SEP]"]
    assert tokens(tok, out["q_input_ids"][1], out["q_attention_mask"][1]) == ["[CLS]", "what", "is", "python", "[SEP]"]
    # padded to the batch's longest row, no longer
    assert out["p_attention_mask"].sum(1).max() == out["p_input_ids"].shape[1]


def test_prefix_spacing_matches_reference_rule():
    assert with_prefix("query:", "x") == "query: x" and with_prefix("", "x") == "x"
    assert with_prefix("query: ", "x") == "query:  x"
    tok = bpe_tokenizer(["query: what is python", "passage: a snake"])
    c = BiencoderCollator(tok, query_prefix="query:", passage_prefix="passage:")
    out = c([item("what is python", ["a snake"])])
    ids = out["q_input_ids"][0][out["q_attention_mask"][0].bool()].tolist()
    assert tok.decode(ids, skip_special_tokens=True) == "query: what is python"
    pids = out["p_input_ids"][0][out["p_attention_mask"][0].bool()].tolist()
    assert tok.decode(pids, skip_special_tokens=True) == "passage: a snake"
    plain = BiencoderCollator(tok)([item("what is python", ["a snake"])])
    assert tok.decode(plain["q_input_ids"][0][plain["q_attention_mask"][0].bool()].tolist(),
                      skip_special_tokens=True) == "what is python"


def test_right_truncation_and_pad_multiple():
    tok = word_tokenizer()
    c = BiencoderCollator(tok, q_max_len=4, p_max_len=5, pad_to_multiple_of=8)
    out = c([item("one two three four five six", ["one two three four five six seven", "one"])])
    assert tokens(tok, out["q_input_ids"][0], out["q_attention_mask"][0]) == ["[CLS]", "one", "two", "[SEP]"]
    assert tokens(tok, out["p_input_ids"][0], out["p_attention_mask"][0]) == ["[CLS]", "one", "two", "three", "[SEP]"]
    assert out["q_input_ids"].shape[1] == 8 and out["p_input_ids"].shape[1] == 8
    c7 = BiencoderCollator(tok, p_max_len=32, pad_to_multiple_of=7)
    assert c7([item("q", ["one two three four five six seven"])])["p_input_ids"].shape[1] == 14  # 9 tokens -> 14
    # The tokenizer's own truncation side is restored after a call.
    tok.truncation_side = "left"
    out = encode_texts(tok, ["one two three four five"], 4)
    assert tokens(tok, out["input_ids"][0], out["attention_mask"][0]) == ["[CLS]", "one", "two", "[SEP]"]
    assert tok.truncation_side == "left"


def test_tokenizer_without_pad_token_uses_eos_and_keeps_side():
    tok = word_tokenizer(kind="decoder")
    assert tok.pad_token is None
    out = BiencoderCollator(tok)(BATCH)
    assert tok.pad_token == "</s>" and tok.padding_side == "right"  # set on the tokenizer, saved with the export
    mask, ids = out["p_attention_mask"], out["p_input_ids"]
    assert (ids[mask == 0] == tok.eos_token_id).all() and (mask[:, 0] == 1).all()
    assert not (mask[:, :-1] < mask[:, 1:]).any()  # right padding: ones then zeros


def test_left_padding():
    tok = word_tokenizer(kind="decoder")
    out = BiencoderCollator(tok, padding_side="left")(BATCH)
    assert tok.padding_side == "left"
    mask = out["p_attention_mask"]
    assert (mask[:, -1] == 1).all() and not (mask[:, :-1] > mask[:, 1:]).any() and (mask == 0).any()
    # the same tokens as right padding, only moved
    right = BiencoderCollator(word_tokenizer(kind="decoder"), padding_side="right")(BATCH)
    for r in range(6):
        assert out["p_input_ids"][r][mask[r].bool()].tolist() == \
            right["p_input_ids"][r][right["p_attention_mask"][r].bool()].tolist()
    with pytest.raises(ValueError, match="padding_side"):
        BiencoderCollator(tok, padding_side="middle")


def test_tokenizer_without_pad_or_eos_is_error():
    tok = word_tokenizer(pad=False)
    assert tok.pad_token is None and tok.eos_token is None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        prepare_tokenizer(tok)
    with pytest.raises(ValueError, match="no pad token"):
        encode_texts(tok, ["x"], 8)


def test_passage_ids_collide_exactly_for_identical_text():
    out = BiencoderCollator(word_tokenizer())(BATCH)
    pid = out["passage_ids"].tolist()
    assert pid[0 * 3 + 1] == pid[1 * 3 + 2]  # "the lazy dog" in both groups
    assert len(set(pid)) == 5
    assert pid[0] == passage_uid_to_int64(text_uid("return a list of parts"))


def test_uneven_groups_rejected():
    bad = [BATCH[0], item("x", ["a", "b"])]
    with pytest.raises(ValueError, match="batch item 1 .* has 2 passages"):
        BiencoderCollator(word_tokenizer())(bad)


def test_pad_rows_empty_row():
    out = pad_rows([[5, 6], []], pad_id=0, padding_side="left", pad_to_multiple_of=3)
    assert out["input_ids"].tolist() == [[0, 5, 6], [0, 0, 0]] and out["attention_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]

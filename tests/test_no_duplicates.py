"""No duplicate in a batch (issue 17, item 7): the same text is one passage id in both data
formats (and under two corpus doc ids), so the loss masks its copies; the no_duplicates sampler
keeps a query's text, positive and negatives out of the rest of its global batch."""
import json

import pytest
import torch

from corpus_fixture import write_corpus
from tokenizer_fixture import word_tokenizer

from embedcore.data.collator import BiencoderCollator
from embedcore.data.dataset import RetrievalDataset
from embedcore.data.formats import Example, Passage, load_examples
from embedcore.data.ids import normalize_text, passage_uid_to_int64, text_key, text_uid
from embedcore.data.mixing import MixingSampler
from embedcore.ops.contrastive import contrastive_loss_reference


def test_normalised_text_key():
    assert normalize_text("  open   a\tfile\n") == "open a file"
    assert text_key("open a  file") == text_key("open a file ") != text_key("Open a file")  # case is kept
    assert text_key("caf\u00e9") == text_key("cafe\u0301")  # NFC: composed and decomposed e-acute
    assert text_key("x") == text_uid("x")  # normalised text: the inline uid itself


def test_same_text_is_one_id_across_formats_and_doc_ids(tmp_path):
    write_corpus(str(tmp_path / "c"), "wiki", {"d1": "Paris is the capital of France.",
                                               "d2": "Paris is the capital of France.",  # a copy under another id
                                               "d3": "Berlin is in Germany."})
    corpus_json = tmp_path / "c.json"
    corpus_json.write_text(json.dumps({"corpus": [{"path": "c"}], "data": [
        {"question_id": "a", "question": "capital of France", "corpus_id": "wiki", "pos_doc": ["d1"], "neg_doc": ["d3"]},
        {"question_id": "b", "question": "French capital", "corpus_id": "wiki", "pos_doc": ["d2"], "neg_doc": ["d3"]}]}))
    inline = tmp_path / "i.jsonl"
    inline.write_text(json.dumps({"query": "France capital city", "pos_doc": "Paris is  the capital of France.",
                                  "neg_doc": "Rome is in Italy."}) + "\n")
    examples = load_examples([str(corpus_json), str(inline)])
    assert len({e.positives[0].uid for e in examples}) == 3  # three uids for one text
    ds = RetrievalDataset(examples, n_passages=2, seed=0, sampled=False)
    batch = BiencoderCollator(word_tokenizer())([ds[i] for i in range(3)])
    ids = batch["passage_ids"].tolist()
    assert ids[0] == ids[2] == ids[4] and len(set(ids)) == 3  # the three positives: one id
    assert ids[0] == passage_uid_to_int64(text_key("Paris is the capital of France."))
    # the loss masks the copies: with these ids it differs from the loss over three distinct positives
    torch.manual_seed(0)
    q, p = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    p[2], p[4] = p[0], p[0]
    q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    masked = contrastive_loss_reference(q, p, 1.0, passage_ids=batch["passage_ids"])
    by_uid = torch.tensor([passage_uid_to_int64(u) for i in range(3) for u in ds[i]["passage_uids"]])
    unmasked = contrastive_loss_reference(q, p, 1.0, passage_ids=by_uid)
    assert masked.item() < unmasked.item() - 1e-3  # the copies no longer count as negatives


def _example(i, pos, negs):
    return Example(query=f"query {i}", qid=str(i), positives=[Passage(pos, text_uid(pos))],
                   negatives=[Passage(n, text_uid(n)) for n in negs], source=f"f:{i + 1}")


def _dataset(n=24, distinct=8):
    """Examples sharing positives: example i's positive is text i % distinct; negatives unique,
    except that example 1's negative is example 0's positive."""
    exs = [_example(i, f"positive {i % distinct}", [f"negative {i}"]) for i in range(n)]
    exs[1].negatives = [Passage("positive 0", text_uid("positive 0"))]
    return RetrievalDataset(exs, n_passages=2, seed=3, sampled=True)


def _dup_batches(ds, sampler, epoch):
    sampler.set_epoch(epoch)
    order, G = sampler.global_order(), sampler.batch_over_ranks
    bad = 0
    for k in range(0, len(order), G):
        keys = [ds.group_keys(i, epoch) for i in order[k:k + G]]
        bad += sum(len(a & b) > 0 for x, a in enumerate(keys) for b in keys[x + 1:])
    return bad, order


@pytest.mark.parametrize("R", [1, 2])
def test_no_duplicates_sampler_keeps_copies_apart(R):
    ds = _dataset(n=30)  # 7 batches of 4: 2 examples of slack at the end of the epoch
    plain = MixingSampler([0] * len(ds), seed=1, batch_over_ranks=4)
    assert sum(_dup_batches(ds, plain, e)[0] for e in range(4)) > 0  # without it, copies do meet
    for r in range(R):
        s = MixingSampler([0] * len(ds), num_replicas=R, rank=r, seed=1, batch_over_ranks=4, keys_of=ds.group_keys)
        for epoch in range(4):
            bad, order = _dup_batches(ds, s, epoch)
            assert bad == 0 and s.forced == 0
            assert len(order) == 28 and len(set(order)) == 28  # no example twice in an epoch
    # resume mid-epoch continues the same duplicate-free plan
    s = MixingSampler([0] * len(ds), seed=1, batch_over_ranks=4, keys_of=ds.group_keys)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(8)]
    again = MixingSampler([0] * len(ds), seed=1, batch_over_ranks=4, keys_of=ds.group_keys)
    again.load_state_dict(s.state_dict())
    assert head + list(again) == s.global_order(2)


def test_no_slack_at_the_end_of_an_epoch_keeps_every_example():
    # 24 examples in 6 batches of 4: the greedy fill (as sentence-transformers') may be left with
    # examples that cannot be separated in the last batch; they are kept and counted, never dropped
    ds = _dataset(n=24)
    s = MixingSampler([0] * len(ds), seed=0, batch_over_ranks=4, keys_of=ds.group_keys)
    plain = MixingSampler([0] * len(ds), seed=0, batch_over_ranks=4)
    bad = forced = plain_bad = 0
    for epoch in range(4):
        b, order = _dup_batches(ds, s, epoch)
        assert sorted(order) == list(range(24))
        bad, forced, plain_bad = bad + b, forced + s.forced, plain_bad + _dup_batches(ds, plain, epoch)[0]
    assert bad >= forced > 0 and plain_bad > bad


def test_unavoidable_duplicates_are_kept_and_counted(caplog):
    ds = _dataset(n=12, distinct=2)  # batches of 4 from two positive texts: 2 duplicates per batch at least
    s = MixingSampler([0] * len(ds), seed=1, batch_over_ranks=4, keys_of=ds.group_keys)
    caplog.set_level("INFO")
    bad, order = _dup_batches(ds, s, 0)
    assert len(order) == 12 and sorted(order) == list(range(12)) and s.forced >= 6 and bad > 0
    assert any("no_duplicates: epoch 0" in r.getMessage() for r in caplog.records)


def test_homogeneous_and_no_duplicates_together():
    ds = _dataset(n=24, distinct=6)
    files = [0] * 12 + [1] * 12
    s = MixingSampler(files, seed=4, batch_over_ranks=4, sampling="round_robin", homogeneous=True,
                      keys_of=ds.group_keys)
    bad, order = _dup_batches(ds, s, 1)
    assert bad == 0 and all(len({files[i] for i in order[k:k + 4]}) == 1 for k in range(0, 24, 4))

"""RetrievalDataset sampling (seeded per seed/epoch/index, positive first, without replacement
when possible, deterministic eval) and ResumableSampler (resume equals uninterrupted, global
batches independent of the number of ranks)."""
import os
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader

from embedcore.data.dataset import RetrievalDataset
from embedcore.data.errors import DataError
from embedcore.data.formats import Example, Passage
from embedcore.data.ids import text_uid
from embedcore.data.sampler import ResumableSampler


def ex(i, n_pos=3, n_neg=9):
    def ps(kind, n):
        return [Passage(f"{kind}{i}.{j}", text_uid(f"{kind}{i}.{j}")) for j in range(n)]
    return Example(query=f"q{i}", qid=f"id{i}", positives=ps("P", n_pos), negatives=ps("N", n_neg), source=f"f:{i + 1}")


EXAMPLES = [ex(i) for i in range(7)]


def items(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_item_layout_positive_first():
    ds = RetrievalDataset(EXAMPLES, n_passages=5, seed=1)
    it = ds[3]
    assert set(it) == {"query", "passages", "passage_uids", "qid", "passage_scores"}
    assert it["passage_scores"] == [None] * 5  # no teacher scores in this data
    assert it["query"] == "q3" and it["qid"] == "id3" and len(it["passages"]) == 5
    assert it["passages"][0].startswith("P3.") and all(p.startswith("N3.") for p in it["passages"][1:])
    assert it["passage_uids"] == [text_uid(p) for p in it["passages"]]
    assert ds[-1]["query"] == "q6"
    with pytest.raises(IndexError):
        ds[7]


def test_reproducible_per_seed_and_epoch_and_differs_across_epochs():
    a = RetrievalDataset(EXAMPLES, n_passages=5, seed=1)
    b = RetrievalDataset(EXAMPLES, n_passages=5, seed=1)
    assert items(a, 0) == items(b, 0) and items(a, 3) == items(b, 3)
    assert items(a, 0) != items(a, 1)
    c = RetrievalDataset(EXAMPLES, n_passages=5, seed=2)
    assert items(a, 0) != items(c, 0)
    # Random access order does not matter (no shared RNG state between items).
    b.set_epoch(3)
    assert [b[i] for i in reversed(range(7))] == list(reversed(items(a, 3)))


def test_same_items_in_another_process():
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); from test_data_sampling import *; "
            "ds = RetrievalDataset(EXAMPLES, n_passages=5, seed=11); print(items(ds, 2))") % (here,)
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=here, check=True).stdout.strip()
    ds = RetrievalDataset(EXAMPLES, n_passages=5, seed=11)
    assert out == str(items(ds, 2))


def test_without_replacement_and_all_choices_reached():
    ds = RetrievalDataset(EXAMPLES, n_passages=9, seed=0)  # 8 of 9 negatives
    seen_pos, seen_neg = set(), set()
    for epoch in range(12):
        it = items(ds, epoch)[0]
        negs = it["passages"][1:]
        assert len(set(negs)) == 8
        seen_pos.add(it["passages"][0])
        seen_neg.update(negs)
    assert seen_pos == {"P0.0", "P0.1", "P0.2"} and len(seen_neg) == 9


def test_cycles_when_too_few_negatives():
    ds = RetrievalDataset([ex(0, n_neg=3)], n_passages=9, seed=5)  # 8 slots, 3 negatives
    negs = ds[0]["passages"][1:]
    assert negs[:3] == negs[3:6] and negs[6:] == negs[:2] and sorted(negs[:3]) == ["N0.0", "N0.1", "N0.2"]


def test_n_passages_one_and_bad_args():
    ds = RetrievalDataset([ex(0, n_neg=0)], n_passages=1, seed=0)
    assert len(ds[0]["passages"]) == 1
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="n_passages"):
            RetrievalDataset(EXAMPLES, n_passages=bad, seed=0)


def test_no_negatives_error_or_counted_skip():
    data = [ex(0), ex(1, n_neg=0), ex(2)]
    with pytest.raises(DataError, match="f:2: example has no negatives"):
        RetrievalDataset(data, n_passages=3, seed=0)
    ds = RetrievalDataset(data, n_passages=3, seed=0, skip_bad=True)
    assert len(ds) == 2 and ds.skipped == {"no_negatives": 1} and [ds[i]["qid"] for i in range(2)] == ["id0", "id2"]
    assert "no_negatives: 1" in ds.summary()


def test_eval_is_deterministic_first_positive_first_negatives():
    ds = RetrievalDataset(EXAMPLES, n_passages=5, seed=1, sampled=False, eval_negative_size=3)
    assert items(ds, 0) == items(ds, 7)
    assert ds[2]["passages"] == ["P2.0", "N2.0", "N2.1", "N2.2"]
    other = RetrievalDataset(EXAMPLES, n_passages=5, seed=99, sampled=False, eval_negative_size=3)
    assert items(other, 0) == items(ds, 0)
    cyc = RetrievalDataset([ex(0, n_neg=2)], n_passages=5, seed=1, sampled=False, eval_negative_size=5)
    assert cyc[0]["passages"] == ["P0.0", "N0.0", "N0.1", "N0.0", "N0.1", "N0.0"]
    default = RetrievalDataset(EXAMPLES, n_passages=3, seed=1, sampled=False)
    assert len(default[0]["passages"]) == 3


# ---- sampler -------------------------------------------------------------------------------
def epoch_indices(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_is_a_seeded_permutation():
    s = ResumableSampler(10, shuffle=True, seed=3)
    e0, e1 = epoch_indices(s, 0), epoch_indices(s, 1)
    assert sorted(e0) == list(range(10)) and e0 != e1 and e0 != list(range(10))
    assert epoch_indices(ResumableSampler(10, seed=3), 0) == e0
    assert epoch_indices(ResumableSampler(10, shuffle=False), 4) == list(range(10))


def test_drop_last_and_wraparound():
    s = ResumableSampler(10, shuffle=False, batch_over_ranks=4)
    assert list(s) == list(range(8)) and len(s) == 8
    s = ResumableSampler(10, shuffle=False, batch_over_ranks=4, drop_last=False)
    assert list(s) == [*range(10), 0, 1] and len(s) == 12
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, batch_over_ranks=4)
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        ResumableSampler(10, num_replicas=2, batch_over_ranks=5)


@pytest.mark.parametrize("R,L", [(2, 3), (3, 2)])
def test_ranks_split_each_global_batch_into_contiguous_chunks(R, L):
    n, G = 31, R * L
    one = DataLoader(list(range(n)), batch_size=G, sampler=ResumableSampler(n, seed=7, batch_over_ranks=G))
    per_rank = [DataLoader(list(range(n)), batch_size=L,
                           sampler=ResumableSampler(n, num_replicas=R, rank=r, seed=7, batch_over_ranks=G))
                for r in range(R)]
    for epoch in (0, 1):
        one.sampler.set_epoch(epoch)
        for loader in per_rank:
            loader.sampler.set_epoch(epoch)
        global_batches = [b.tolist() for b in one]
        rank_batches = [[b.tolist() for b in loader] for loader in per_rank]
        assert len(global_batches) == n // G
        for k, gb in enumerate(global_batches):
            assert sum((rank_batches[r][k] for r in range(R)), []) == gb


def run_with_checkpoint(n, G, R, stop_after, epochs=2, seed=5):
    """Take `stop_after` batches, save every rank's state, rebuild and continue; return all batches."""
    L = G // R
    made = [ResumableSampler(n, num_replicas=R, rank=r, seed=seed, batch_over_ranks=G) for r in range(R)]
    seen, states = [[] for _ in range(R)], None
    for r, s in enumerate(made):
        loader = DataLoader(list(range(n)), batch_size=L, sampler=s)
        s.set_epoch(0)
        it = iter(loader)
        for _ in range(stop_after):
            seen[r].append(next(it).tolist())
    states = [s.state_dict() for s in made]
    del made
    for r in range(R):
        s = ResumableSampler(n, num_replicas=R, rank=r, seed=seed, batch_over_ranks=G)
        s.load_state_dict(states[r])
        loader = DataLoader(list(range(n)), batch_size=L, sampler=s)
        for epoch in range(s.epoch, epochs):
            s.set_epoch(epoch)
            seen[r].extend(b.tolist() for b in loader)
    return seen, states


@pytest.mark.parametrize("R", [1, 2])
def test_resume_mid_epoch_equals_uninterrupted(R):
    n, G = 23, 4
    resumed, states = run_with_checkpoint(n, G, R, stop_after=3)
    assert states[0]["epoch"] == 0 and states[0]["position"] == 3 * G
    for r in range(R):
        s = ResumableSampler(n, num_replicas=R, rank=r, seed=5, batch_over_ranks=G)
        loader = DataLoader(list(range(n)), batch_size=G // R, sampler=s)
        straight = []
        for epoch in range(2):
            s.set_epoch(epoch)
            straight.extend(b.tolist() for b in loader)
        assert resumed[r] == straight


def test_resume_at_end_of_epoch_and_with_other_world_size():
    n, G = 12, 4
    # Checkpoint right after the last batch of epoch 0: resuming yields nothing more for epoch 0.
    resumed, states = run_with_checkpoint(n, G, 1, stop_after=3)
    assert states[0]["position"] == 12
    straight = [b.tolist() for e in range(2) for b in _loader_epoch(n, G, e)]
    assert resumed[0] == straight
    # A 1-rank state loaded into 2 ranks with the same global batch continues the same global order.
    s1 = ResumableSampler(n, seed=5, batch_over_ranks=G)
    it = iter(DataLoader(list(range(n)), batch_size=G, sampler=s1))
    first = next(it).tolist()
    state = s1.state_dict()
    halves = []
    for r in range(2):
        s = ResumableSampler(n, num_replicas=2, rank=r, seed=5, batch_over_ranks=G)
        s.load_state_dict(state)
        halves.append([b.tolist() for b in DataLoader(list(range(n)), batch_size=2, sampler=s)])
    rest = [b.tolist() for b in it]
    assert [halves[0][k] + halves[1][k] for k in range(2)] == rest and first not in rest


def _loader_epoch(n, G, epoch):
    s = ResumableSampler(n, seed=5, batch_over_ranks=G)
    s.set_epoch(epoch)
    return DataLoader(list(range(n)), batch_size=G, sampler=s)


def test_state_mismatch_and_consumed_override():
    s = ResumableSampler(20, seed=1, batch_over_ranks=4)
    with pytest.raises(ValueError, match="seed=2"):
        s.load_state_dict({**s.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="length=21"):
        s.load_state_dict({**s.state_dict(), "length": 21})
    it = iter(s)
    for _ in range(12):  # a worker prefetched 3 batches, the loop used only 1
        next(it)
    assert s.state_dict()["position"] == 12 and s.state_dict(consumed=4)["position"] == 4
    with pytest.raises(ValueError, match="whole number of local batches"):
        s.state_dict(consumed=5)
    s2 = ResumableSampler(20, seed=1, batch_over_ranks=4)
    s2.load_state_dict(s.state_dict(consumed=4))
    assert s2.state_dict()["position"] == 4  # still pending: the state round-trips before iterating
    assert list(s2) == list(s.global_order())[4:20]


def test_real_entries_of_padded_batches():
    n, G, R = 11, 4, 2  # 3 global batches = 12 positions, the last one is padding
    counts = []
    for r in range(R):
        s = ResumableSampler(n, num_replicas=R, rank=r, shuffle=False, drop_last=False, batch_over_ranks=G)
        batches = [b.tolist() for b in DataLoader(list(range(n)), batch_size=2, sampler=s)]
        counts.append([s.real_in_local_batch(k) for k in range(len(batches))])
        real = [i for k, b in enumerate(batches) for i in b[: counts[r][k]]]
        assert len(set(real)) == len(real)
    assert counts == [[2, 2, 2], [2, 2, 1]]


def test_summary_carries_load_time_skips(tmp_path):
    from embedcore.data.formats import load_examples
    f = tmp_path / "d.jsonl"
    f.write_text('{"query": "a", "pos_doc": "p", "neg_doc": "n"}\n{"query": "b"}\n{"query": "c", "pos_doc": "p2"}\n')
    ds = RetrievalDataset(load_examples([str(f)], skip_bad=True), n_passages=2, seed=0)
    assert len(ds) == 1 and ds.skipped == {"empty_positive": 1, "no_negatives": 1}
    assert ds.summary() == "1 queries x 2 passages (sampled); skipped empty_positive: 1, no_negatives: 1"

"""Several datasets mixed as configured (issue 17, item 6): MixingSampler's modes (proportional,
round_robin, weights), homogeneous batches across ranks, exact shares, exact resume, no global
RNG touched, and the config keys that drive it (each error names the key)."""
import pytest
import torch
from torch.utils.data import DataLoader

from train_fixture import base_config, write_dataset

from embedcore.data.mixing import MixingSampler, largest_remainder
from embedcore.data.sampler import ResumableSampler
from embedcore.train.config import ConfigError, config_from_dict

DS = [0] * 9 + [1] * 23 + [2] * 12  # three datasets of 9, 23 and 12 examples (N = 44)


def batches(sampler, epoch):
    sampler.set_epoch(epoch)
    order = sampler.global_order()
    G = sampler.batch_over_ranks
    return [order[k:k + G] for k in range(0, len(order), G)]


def labels(batch):
    return [DS[i] for i in batch]


def test_largest_remainder_is_exact():
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    assert largest_remainder([9, 23, 12], 11) == [2, 6, 3]
    assert sum(largest_remainder([0.1, 0.7, 0.2], 97)) == 97


@pytest.mark.parametrize("R", [1, 2])
def test_proportional_without_homogeneous_is_the_plain_order(R):
    for r in range(R):
        mix = MixingSampler(DS, num_replicas=R, rank=r, seed=3, batch_over_ranks=4)
        plain = ResumableSampler(len(DS), num_replicas=R, rank=r, seed=3, batch_over_ranks=4)
        for epoch in (0, 1):
            mix.set_epoch(epoch)
            plain.set_epoch(epoch)
            assert list(mix) == list(plain)


@pytest.mark.parametrize("sampling,weights", [("proportional", None), ("round_robin", None), ("weights", [1, 0, 3])])
def test_homogeneous_batches_across_ranks_and_exact_shares(sampling, weights):
    G, R = 4, 2
    per_rank = [MixingSampler(DS, num_replicas=R, rank=r, seed=11, batch_over_ranks=G, sampling=sampling,
                              weights=weights, homogeneous=True) for r in range(R)]
    loaders = [DataLoader(list(range(len(DS))), batch_size=G // R, sampler=s) for s in per_rank]
    for epoch in (0, 1):
        for s in per_rank:
            s.set_epoch(epoch)
        rank_batches = [[b.tolist() for b in loader] for loader in loaders]
        assert len(rank_batches[0]) == len(DS) // G  # the epoch length does not depend on the mode
        global_batches = [rank_batches[0][k] + rank_batches[1][k] for k in range(len(DS) // G)]
        assert all(len(set(labels(b))) == 1 for b in global_batches), [labels(b) for b in global_batches]
        counts = [sum(labels(b)[0] == d for b in global_batches) for d in range(3)]
        shares = {"proportional": [9, 23, 12], "round_robin": [1, 1, 1], "weights": [1, 0, 3]}[sampling]
        if sampling == "round_robin":
            assert [labels(b)[0] for b in global_batches] == [0, 1, 2] * 3 + [0, 1]
        else:
            assert counts == largest_remainder(shares, len(DS) // G)


def test_weights_per_position_and_without_replacement_within_a_dataset():
    s = MixingSampler(DS, seed=2, batch_over_ranks=4, sampling="weights", weights=[1, 1, 2])
    for epoch in (0, 1):
        order = [i for b in batches(s, epoch) for i in b]
        per = [[i for i in order if DS[i] == d] for d in range(3)]
        assert [len(p) for p in per] == largest_remainder([1, 1, 2], len(order))  # exact: [11, 11, 22]
        # dataset 0 (9 examples) drawn 11 times: one full pass, then a new permutation
        assert sorted(per[0][:9]) == list(range(9)) and len(set(per[0][9:])) == 2
        assert len(set(per[1])) == len(per[1])  # drawn fewer times than it has examples: no repeat
        assert any(len(set(labels(b))) > 1 for b in batches(s, epoch))  # positions mix datasets
    assert batches(s, 0) != batches(s, 1)


def test_round_robin_positions_and_unshuffled_interleaving():
    rr = MixingSampler(DS, seed=2, batch_over_ranks=4, sampling="round_robin")
    assert labels(batches(rr, 0)[0]) == [0, 1, 2, 0] and labels(batches(rr, 0)[1]) == [1, 2, 0, 1]
    fixed = MixingSampler(DS, seed=2, batch_over_ranks=4, sampling="weights", weights=[1, 0, 1], shuffle=False)
    order = [i for b in batches(fixed, 0) for i in b]
    assert [DS[i] for i in order][:6] == [0, 2, 0, 2, 0, 2]  # spread evenly, files in order
    assert [i for i in order if DS[i] == 0][:9] == list(range(9))
    assert batches(fixed, 0) == batches(fixed, 1)


def test_the_plan_touches_no_global_rng_and_is_a_pure_function():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = batches(MixingSampler(DS, seed=5, batch_over_ranks=4, sampling="weights", weights=[2, 1, 1],
                              homogeneous=True), 3)
    assert torch.equal(before, torch.get_rng_state())
    b = batches(MixingSampler(DS, seed=5, batch_over_ranks=4, sampling="weights", weights=[2, 1, 1],
                              homogeneous=True), 3)
    assert a == b


@pytest.mark.parametrize("R", [1, 2])
def test_resume_mid_epoch_equals_uninterrupted(R):
    G, L, stop = 4, 4 // R, 4

    def make(r):
        return MixingSampler(DS, num_replicas=R, rank=r, seed=9, batch_over_ranks=G, sampling="weights",
                             weights=[3, 1, 2], homogeneous=True)

    for r in range(R):
        straight = []
        s = make(r)
        for epoch in range(2):
            s.set_epoch(epoch)
            straight += [b.tolist() for b in DataLoader(list(range(len(DS))), batch_size=L, sampler=s)]
        first = make(r)
        first.set_epoch(0)
        it = iter(DataLoader(list(range(len(DS))), batch_size=L, sampler=first))
        seen = [next(it).tolist() for _ in range(stop)]
        state = first.state_dict()
        assert state["position"] == stop * G and state["mixing"]["dataset_sizes"] == [9, 23, 12]
        again = make(r)
        again.load_state_dict(state)
        for epoch in range(again.epoch, 2):
            again.set_epoch(epoch)
            seen += [b.tolist() for b in DataLoader(list(range(len(DS))), batch_size=L, sampler=again)]
        assert seen == straight


def test_state_from_other_settings_is_refused():
    s = MixingSampler(DS, seed=1, batch_over_ranks=4, sampling="weights", weights=[1, 1, 1])
    state = s.state_dict()
    with pytest.raises(ValueError, match="weights="):
        MixingSampler(DS, seed=1, batch_over_ranks=4, sampling="weights", weights=[1, 2, 1]).load_state_dict(state)
    with pytest.raises(ValueError, match="homogeneous="):
        MixingSampler(DS, seed=1, batch_over_ranks=4, sampling="weights", weights=[1, 1, 1],
                      homogeneous=True).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_sizes="):
        MixingSampler(DS[:-1] + [0], seed=1, batch_over_ranks=4, sampling="weights",
                      weights=[1, 1, 1]).load_state_dict(state)
    plain = ResumableSampler(len(DS), seed=1, batch_over_ranks=4).state_dict()
    with pytest.raises(ValueError, match="no mixing settings"):
        s.load_state_dict(plain)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="one weight per dataset"):
        MixingSampler(DS, batch_over_ranks=4, sampling="weights", weights=[1, 1])
    with pytest.raises(ValueError, match="not all 0"):
        MixingSampler(DS, batch_over_ranks=4, sampling="weights", weights=[0, 0, 0])
    with pytest.raises(ValueError, match=r"dataset\(s\) \[0\] have \[9\] examples, fewer than one global batch of 10"):
        MixingSampler(DS, batch_over_ranks=10, homogeneous=True)
    with pytest.raises(ValueError, match=r"dataset\(s\) \[3\] have a weight but no example"):
        MixingSampler(DS, batch_over_ranks=4, sampling="weights", weights=[1, 1, 1, 1], num_datasets=4)


# ------------------------------------------------------------------------------ config and build
def _cfg(tmp_path, **dataset):
    a = write_dataset(str(tmp_path / "a.jsonl"), 8)
    b = write_dataset(str(tmp_path / "b.jsonl"), 12, seed=1)
    data = base_config("model", a, a, str(tmp_path / "ck"))
    data["dataloader"]["dataset"].update(data_dir_list=[a, b], **dataset)
    return data


@pytest.mark.parametrize("dataset,val,message", [
    ({"sampling": "weights"}, {}, r"dataloader.dataset.data_weights: sampling weights needs one weight per data_dir_list entry \(2\)"),
    ({"sampling": "weights", "data_weights": [1, -1]}, {}, r"dataloader.dataset.data_weights\[1\]: must be a finite number >= 0"),
    ({"sampling": "weights", "data_weights": [0, 0]}, {}, "at least one weight must be > 0"),
    ({"sampling": "weights", "data_weights": [1, float("inf")]}, {}, r"data_weights\[1\]: must be a finite number"),
    ({"data_weights": [1, 2]}, {}, "only used with sampling: weights"),
    ({"sampling": "mixed"}, {}, "dataloader.dataset.sampling: expected one of"),
    ({}, {"homogeneous_batches": True}, "validation_dataloader.dataset.homogeneous_batches: only for training"),
    ({}, {"no_duplicates": True}, "validation_dataloader.dataset.no_duplicates: only for training"),
])
def test_config_errors_name_the_key(tmp_path, dataset, val, message):
    data = _cfg(tmp_path, **dataset)
    data["validation_dataloader"]["dataset"].update(val)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_build_picks_the_mixing_sampler_only_when_asked(tmp_path):
    from embedcore.train import build
    from embedcore.distributed import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    plain = config_from_dict(_cfg(tmp_path))
    ds = build.build_dataset(plain, plain.dataloader, train=True)
    assert ds.file_indices == [0] * 8 + [1] * 12
    _, sampler = build.build_train_loader(plain, ds, None, info)
    assert type(sampler) is ResumableSampler  # defaults: today's sampler and state, bit for bit
    mixed = config_from_dict(_cfg(tmp_path, sampling="weights", data_weights=[1, 3], homogeneous_batches=True))
    _, sampler = build.build_train_loader(mixed, ds, None, info)
    assert isinstance(sampler, MixingSampler) and sampler.shares == [1.0, 3.0] and sampler.homogeneous
    order, L = list(sampler), mixed.step_scheduler.local_batch_size
    files = [{ds.file_indices[i] for i in order[k:k + L]} for k in range(0, len(order), L)]
    assert len(files) == 10 and all(len(f) == 1 for f in files)  # each batch from one file
    assert sum(f == {1} for f in files) == 7  # weights 1:3 of 10 batches: 2.5 / 7.5, the tie to file 0: 3 / 7
    big = config_from_dict(_cfg(tmp_path, homogeneous_batches=True))
    big.step_scheduler.local_batch_size = 9
    with pytest.raises(ConfigError, match=r"dataloader.dataset: homogeneous batches: dataset\(s\) \[0\]"):
        build.build_train_loader(big, ds, None, info)

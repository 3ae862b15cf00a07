"""Several datasets in one run, mixed as configured, and batches without duplicates.

``MixingSampler`` is a ResumableSampler (same rank split, same state_dict / load_state_dict,
same exact resume) whose epoch order is built batch by batch from per-dataset streams. A
*dataset* is one data file (``Example.file_index``: one ``data_dir_list`` entry).

Epoch length. Every mode yields ``N // G`` global batches per epoch (N: all examples, G: the
global batch), as the plain sampler does, so steps per epoch, the LR schedule and resume
positions do not depend on the mode; the mode only decides which dataset fills each batch
(``homogeneous_batches: true``) or each position of a batch (false):

* ``proportional``: as many as each dataset holds. Without homogeneous batches this is exactly
  the plain sampler's order (one seeded permutation of all N examples: today's behaviour);
  with them, dataset d fills ``round(nb * n_d / N)`` of the ``nb`` batches (largest remainder).
* ``weights``: dataset d fills a share ``w_d / sum(w)`` of the batches (or positions), counts
  again by largest remainder, so the shares are exact in every epoch, not just on average.
* ``round_robin``: datasets take turns (batch by batch, or position by position), equal shares
  whatever their sizes.

Which batch (position) gets which dataset is a seeded shuffle of those counts per epoch
(``shuffle: false``: an even interleaving). Within a dataset the examples come from a seeded
permutation per (epoch, dataset, pass): a dataset drawn more often than it has examples starts
a new permutation, one drawn less often leaves the rest of its permutation for the next epoch
to redraw. All randomness comes from blake2b(seed, epoch, ...), never from a global RNG: the
order is a pure function of (seed, epoch, datasets, settings), which is what makes resume exact
(the state is the epoch and the number of global batches consumed).

Homogeneous batches: every global batch (over all ranks: the rank chunks are cut from it)
holds examples of one dataset only, so in-batch negatives are of the same task (BGE's
``same_dataset_within_batch``). A dataset with fewer examples than one global batch is refused
(its batches would repeat examples).

No duplicates (``no_duplicates: true``, after sentence-transformers' NoDuplicatesBatchSampler):
a batch is filled position by position; a candidate whose query text or any of the passages
drawn for it this epoch (positive and negatives, by normalised text key) is already in the
batch is deferred to a later batch of the same stream, and the next candidate is tried. The
scan is bounded (``SCAN`` candidates); when nothing clean is found the oldest deferred one is
taken anyway (the loss still masks the copy by passage id), and ``forced`` counts those (logged
once per epoch). Being greedy, this happens mostly in the last batch or two of an epoch, when
the examples left cannot be separated (N % G examples of slack help). A
deferred example is used later in the epoch, not dropped: every plain epoch still uses each
example once (except the N % G left over, as without the option).
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque

import torch

from embedcore.data.sampler import ResumableSampler, _epoch_seed

__all__ = ["MixingSampler", "SAMPLING_MODES", "largest_remainder"]

SAMPLING_MODES = ("proportional", "round_robin", "weights")
SCAN = 64  # candidates looked at for one position before a duplicate is accepted
log = logging.getLogger(__name__)


def _seed(*parts) -> int:
    key = ":".join(str(p) for p in ("mix", *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def largest_remainder(shares, total: int) -> list:
    """Integer counts summing to ``total``, proportional to ``shares`` (Hamilton's method; ties to
    the lower index)."""
    s = float(sum(shares))
    exact = [total * w / s for w in shares]
    counts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda d: (-(exact[d] - counts[d]), d))
    for d in order[: total - sum(counts)]:
        counts[d] += 1
    return counts


def _interleave(counts) -> list:
    """Labels with the given counts, spread evenly (the dataset furthest behind its share goes next)."""
    total = sum(counts)
    got = [0] * len(counts)
    labels = []
    for i in range(total):
        d = max((d for d in range(len(counts)) if got[d] < counts[d]),
                key=lambda d: (counts[d] * (i + 1) / total - got[d], -d))
        labels.append(d)
        got[d] += 1
    return labels


class _Stream:
    """The examples of one dataset in seeded permutations, one per pass (cycle=False: one pass only)."""

    def __init__(self, indices, shuffle: bool, seed_of, cycle: bool):
        self.indices, self.shuffle, self.seed_of, self.cycle = list(indices), shuffle, seed_of, cycle
        self.passes, self.buf, self.pos = 0, [], 0

    def next(self):
        if self.pos == len(self.buf):
            if self.passes and not self.cycle:
                return None
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed_of(self.passes))
                self.buf = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]
            else:
                self.buf = list(self.indices)
            self.passes += 1
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]


class MixingSampler(ResumableSampler):
    """A ResumableSampler over several datasets; see the module docstring.

    Args:
        dataset_of: the dataset (file index) of every item, len = the dataset length.
        sampling: "proportional" | "round_robin" | "weights".
        weights: one non-negative share per dataset (sampling="weights" only).
        homogeneous: every global batch from one dataset.
        keys_of: ``keys_of(index, epoch) -> set`` of duplicate keys (RetrievalDataset.group_keys);
            given, batches are kept free of duplicates (no_duplicates).
        num_datasets: how many datasets there are (None: max(dataset_of) + 1; give it when a
            trailing file may have lost all its examples to skipping).
        num_replicas, rank, shuffle, seed, batch_over_ranks: as ResumableSampler (drop_last is
            always true: every step sees a full global batch).
    """

    def __init__(self, dataset_of, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 batch_over_ranks: int | None = None, sampling: str = "proportional", weights=None,
                 homogeneous: bool = False, keys_of=None, num_datasets: int | None = None):
        super().__init__(len(dataset_of), num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=True,
                         batch_over_ranks=batch_over_ranks)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.dataset_of = [int(d) for d in dataset_of]
        k = max(self.dataset_of) + 1 if num_datasets is None else int(num_datasets)
        if min(self.dataset_of) < 0 or max(self.dataset_of) >= k:
            raise ValueError(f"dataset indices must lie in [0, {k}), got {min(self.dataset_of)}..{max(self.dataset_of)}")
        self.members = [[i for i, d in enumerate(self.dataset_of) if d == j] for j in range(k)]
        self.sizes = [len(m) for m in self.members]
        if sampling == "weights":
            if weights is None or len(weights) != k:
                raise ValueError(f"sampling 'weights' needs one weight per dataset ({k}), got {weights!r}")
            shares = [float(w) for w in weights]
        elif sampling == "proportional":
            shares = [float(n) for n in self.sizes]
        else:
            shares = [1.0 if n else 0.0 for n in self.sizes]
        if any(w < 0 or w != w or w == float("inf") for w in shares) or sum(shares) <= 0:
            raise ValueError(f"dataset weights must be finite, >= 0 and not all 0, got {shares}")
        empty = [d for d, (n, w) in enumerate(zip(self.sizes, shares)) if w > 0 and n == 0]
        if empty:
            raise ValueError(f"dataset(s) {empty} have a weight but no example (after skipping)")
        if homogeneous:
            small = [d for d, (n, w) in enumerate(zip(self.sizes, shares)) if w > 0 and n < self.batch_over_ranks]
            if small:
                raise ValueError(f"homogeneous batches: dataset(s) {small} have {[self.sizes[d] for d in small]} "
                                 f"examples, fewer than one global batch of {self.batch_over_ranks}")
        self.sampling, self.shares, self.homogeneous, self.keys_of = sampling, shares, bool(homogeneous), keys_of
        self.weights = None if weights is None else [float(w) for w in weights]
        self.forced = 0  # duplicates accepted in the last planned epoch (no clean candidate in reach)
        self._plan = (None, None)  # (epoch, order): the last epoch planned
        self._key_cache = {}

    # -- the plan of one epoch ----------------------------------------------------------------
    def _labels(self, epoch: int, total: int) -> list:
        """The dataset of each of `total` slots (batches or positions)."""
        active = [d for d, w in enumerate(self.shares) if w > 0]
        if self.sampling == "round_robin":
            return [active[i % len(active)] for i in range(total)]
        counts = largest_remainder(self.shares, total)
        if not self.shuffle:
            return _interleave(counts)
        labels = [d for d, c in enumerate(counts) for _ in range(c)]
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "labels"))
        return [labels[i] for i in torch.randperm(total, generator=g).tolist()]

    def _streams(self, epoch: int) -> list:
        if self.sampling == "proportional" and not self.homogeneous:
            # One stream over everything, with the plain sampler's permutation: today's order.
            seed = _epoch_seed(self.seed, epoch)
            return [_Stream(range(self.length), self.shuffle, lambda _p: seed, cycle=False)]
        return [_Stream(m, self.shuffle, lambda p, d=d: _seed(self.seed, epoch, d, p), cycle=True)
                for d, m in enumerate(self.members)]

    def global_order(self, epoch: int | None = None) -> list:
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan[0] == epoch:
            return self._plan[1]
        G, nb = self.batch_over_ranks, self.num_global_batches
        streams = self._streams(epoch)
        if len(streams) == 1:
            slots = [0] * (nb * G)
        elif self.homogeneous:
            slots = [d for d in self._labels(epoch, nb) for _ in range(G)]
        else:
            slots = self._labels(epoch, nb * G)
        deferred = [deque() for _ in streams]
        self.forced = 0
        self._key_cache = {}
        order = []
        for b in range(nb):
            taken: set = set()
            for d in slots[b * G:(b + 1) * G]:
                order.append(self._pick(streams[d], deferred[d], taken, epoch))
        self._key_cache = {}
        if self.forced and self.rank == 0:
            log.info("no_duplicates: epoch %d: %d of %d examples had to share a batch with a duplicate "
                     "(masked by passage id in the loss)", epoch, self.forced, nb * G)
        self._plan = (epoch, order)
        return order

    def _keys(self, idx: int, epoch: int):
        keys = self._key_cache.get(idx)
        if keys is None:
            keys = self._key_cache[idx] = self.keys_of(idx, epoch)
        return keys

    def _pick(self, stream: _Stream, deferred: deque, taken: set, epoch: int) -> int:
        if self.keys_of is None:
            return stream.next()
        for j, idx in enumerate(deferred):  # older candidates first
            if j >= SCAN:
                break
            keys = self._keys(idx, epoch)
            if not keys & taken:
                del deferred[j]
                taken |= keys
                return idx
        for _ in range(SCAN):
            idx = stream.next()
            if idx is None:  # one pass only (the plain order) and it is used up
                break
            keys = self._keys(idx, epoch)
            if not keys & taken:
                taken |= keys
                return idx
            deferred.append(idx)
        self.forced += 1
        idx = deferred.popleft() if deferred else stream.next()
        taken |= self._keys(idx, epoch)
        return idx

    # -- resume -------------------------------------------------------------------------------
    def _signature(self) -> dict:
        return {"sampling": self.sampling, "weights": self.weights, "homogeneous": self.homogeneous,
                "no_duplicates": self.keys_of is not None, "dataset_sizes": list(self.sizes)}

    def state_dict(self, consumed: int | None = None) -> dict:
        return {**super().state_dict(consumed), "mixing": self._signature()}

    def load_state_dict(self, state: dict) -> None:
        """As ResumableSampler's; also refuses a state saved with other datasets or mixing settings."""
        mine = self._signature()
        saved = state.get("mixing")
        if saved is None:
            raise ValueError(f"sampler state has no mixing settings but this run mixes datasets ({mine}); "
                             f"resuming would not continue the same order")
        for key, value in mine.items():
            if saved.get(key) != value:
                raise ValueError(f"sampler state has {key}={saved.get(key)!r} but this run has {value!r}; "
                                 f"resuming would not continue the same order")
        super().load_state_dict(state)

"""A resumable, rank-aware sampler whose global order does not depend on the number of ranks.

How indices are split: epoch ``e`` has one *global order* (a permutation of ``range(length)``
seeded by (seed, e), or the identity when shuffle=False). The order is cut into consecutive
batches of ``G = batch_over_ranks`` indices, one DataLoader step of every rank (the config's
``step_scheduler.global_batch_size`` is G x the gradient-accumulation steps); batch ``b`` is cut into
``num_replicas`` contiguous chunks of ``L = G / num_replicas`` indices, and rank ``r`` takes
chunk ``r``. Used through a plain ``DataLoader(dataset, batch_size=L, sampler=sampler)``, each
DataLoader batch on rank r is exactly its chunk of one global batch, so a 2-rank run with
``L`` per rank sees the same global batches as a 1-rank run with ``batch_size=2L``.

``G`` is the number of examples one DataLoader step consumes over all ranks, i.e.
``local_batch_size * num_replicas`` (gradient accumulation is *not* included: consecutive
micro-steps take consecutive global batches). ``batch_over_ranks=None`` means
``num_replicas`` (rank r takes every num_replicas-th index, like DistributedSampler).

The tail: with ``drop_last=True`` an incomplete last global batch is dropped; otherwise it is
filled by wrapping around to the start of the order, so every rank yields the same number of
indices (collectives would hang otherwise).

Resume: ``state_dict()`` holds the epoch and the number of global positions consumed (always a
whole number of global batches); after ``load_state_dict`` the next ``__iter__`` (for that
epoch) continues at that position, and later epochs start from 0. The position counts indices
this sampler has *yielded*, which equals what the training loop consumed with
``num_workers=0``; with worker processes (which prefetch) pass the loop's own count:
``state_dict(consumed=batches_taken_from_this_iterator * local_batch_size)``. The state may be loaded with a
different num_replicas as long as ``G`` is the same.
"""
import hashlib

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


def _epoch_seed(seed: int, epoch: int) -> int:
    key = f"sampler:{int(seed)}:{int(epoch)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class ResumableSampler(Sampler):
    """Yields this rank's indices of a seeded global order; see the module docstring.

    Args:
        length: the dataset length.
        num_replicas, rank: world size and this process's rank.
        shuffle: permute per epoch (seeded by seed and epoch) or keep 0..length-1.
        seed: the shuffle seed; identical on every rank.
        drop_last: drop the incomplete last global batch (else wrap around to fill it).
        batch_over_ranks: indices per DataLoader step over all ranks (local batch x ranks);
            must be a multiple of num_replicas. None: num_replicas.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, batch_over_ranks: int | None = None):
        if length < 1:
            raise ValueError(f"cannot sample from an empty dataset (length {length})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        G = num_replicas if batch_over_ranks is None else int(batch_over_ranks)
        if G < 1 or G % num_replicas:
            raise ValueError(f"batch_over_ranks {G} must be a positive multiple of num_replicas {num_replicas}")
        if drop_last and length < G:
            raise ValueError(f"dataset has {length} examples, fewer than one global batch of {G} "
                             f"(drop_last=True would yield nothing)")
        self.length, self.num_replicas, self.rank = int(length), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.batch_over_ranks = G
        self.local_batch_size = G // num_replicas
        self.num_global_batches = length // G if drop_last else -(-length // G)
        self.epoch = 0
        self._resume_from = 0  # global positions to skip at the next __iter__ (set by load_state_dict)
        self._iter_start = 0  # global position where the current iteration started
        self._yielded = 0  # local indices yielded by the current iteration

    def __len__(self) -> int:
        """Local indices in a whole epoch (a resumed epoch yields fewer)."""
        return self.num_global_batches * self.local_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A pending resume position is kept only for its own epoch."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._resume_from = 0
            self._iter_start = 0
            self._yielded = 0
        self.epoch = epoch

    def global_order(self, epoch: int | None = None) -> list:
        """The epoch's global order, padded/truncated to whole global batches (all ranks agree)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_global_batches * self.batch_over_ranks
        while len(order) < total:  # drop_last=False: wrap around (repeatedly if length < G)
            order += order[: total - len(order)]
        return order[:total]

    def real_in_local_batch(self, k: int) -> int:
        """How many leading entries of this rank's k-th local batch of an epoch are real (the rest
        are wrap-around padding, drop_last=False only). For exact validation metrics: count only
        those, so that every example is counted once while all ranks still run the same steps."""
        start = k * self.batch_over_ranks + self.rank * self.local_batch_size
        return max(0, min(self.local_batch_size, self.length - start))

    def __iter__(self):
        order = self.global_order()
        G, L = self.batch_over_ranks, self.local_batch_size
        start = self._resume_from
        self._resume_from = 0
        self._iter_start = start
        self._yielded = 0
        for b in range(start // G, self.num_global_batches):
            lo = b * G + self.rank * L
            for idx in order[lo: lo + L]:
                self._yielded += 1
                yield idx

    def _global_position(self, local: int) -> int:
        if local % self.local_batch_size:
            raise ValueError(f"sampler position {local} is not a whole number of local batches of "
                             f"{self.local_batch_size}: take the state between DataLoader batches")
        return self._iter_start + (local // self.local_batch_size) * self.batch_over_ranks

    def state_dict(self, consumed: int | None = None) -> dict:
        """{epoch, position (global positions consumed), seed, length, ...}.

        ``consumed``: local indices the loop has taken from the current iterator (batches taken
        x local batch size); needed only when workers prefetch ahead of the loop.
        """
        if self._resume_from:  # loaded but not iterated yet: the loaded state is still current
            position = self._resume_from
        elif consumed is not None:
            position = self._global_position(int(consumed))
        else:
            position = self._global_position(self._yielded)
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "length": self.length,
                "shuffle": self.shuffle, "batch_over_ranks": self.batch_over_ranks, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s epoch and position on the next ``__iter__``.

        Raises ValueError when the state came from a different dataset length, seed, shuffle,
        drop_last or global batch size (the order would silently differ).
        """
        for key in ("seed", "length", "shuffle", "batch_over_ranks", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                                 f"resuming would not continue the same order")
        position = int(state["position"])
        if position % self.batch_over_ranks or position < 0:
            raise ValueError(f"sampler state position {position} is not a multiple of the global batch "
                             f"{self.batch_over_ranks}")
        self.epoch = int(state["epoch"])
        self._resume_from = position
        self._iter_start = position
        self._yielded = 0

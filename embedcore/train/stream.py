"""The training data stream: the micro-batches of every optimizer step, epoch after epoch.

The order of an epoch is a pure function of the seed and the epoch (ResumableSampler and
MixingSampler seed each epoch's order; the dataset draws its negatives per epoch), so the
stream's position follows from the optimizer step alone: epoch = step // steps_per_epoch, and
(step % steps_per_epoch) x accum micro-batches into it. The trainer keeps the step; a checkpoint
stores `state_dict()` beside it so that a resume with another seed, dataset, mixing or global
batch is refused instead of silently continuing a different order.

Why not torchdata's StatefulDataLoader (which the reference config names): it snapshots the
sampler's and every worker's iteration state; with an order derived from (seed, epoch) there is
nothing to snapshot but a position, and a plain DataLoader whose workers prefetch is resumed
exactly by counting the batches the loop took (not those the workers produced). One dependency
fewer, and a checkpoint that is a few JSON numbers.
"""
from __future__ import annotations

from embedcore.errors import CheckpointError


class BatchStream:
    """`next_step()` returns the `accum` micro-batches of the next optimizer step. The tail of an
    epoch that does not fill a whole optimizer step is dropped (steps_per_epoch counts whole ones)."""

    def __init__(self, loader, sampler, dataset, steps_per_epoch: int, accum: int):
        self.loader, self.sampler, self.dataset = loader, sampler, dataset
        self.steps_per_epoch, self.accum = steps_per_epoch, accum
        self.per_epoch = steps_per_epoch * accum  # micro-batches used of each epoch
        self.global_batch = loader.batch_size * sampler.num_replicas  # sampler positions per micro-batch
        # The current epoch, the micro-batches taken from it and, of those, how many before its
        # iterator began (a resumed epoch's iterator starts mid-epoch); no iterator until needed.
        self._epoch, self._taken, self._taken_at_open, self._batches = 0, 0, 0, None

    def epoch_of(self, step: int) -> int:
        """The epoch of optimizer step `step` (1-based: step 1 is the first of epoch 0; 0 is epoch 0)."""
        return max(step - 1, 0) // self.steps_per_epoch

    def start(self, step: int, state: dict | None = None) -> None:
        """Continue after `step` optimizer steps; `state` is what state_dict() returned then (None
        for a fresh run). A state from another order is a CheckpointError, raised here."""
        epoch, into = divmod(step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        if state is not None:
            want = into * self.accum * self.global_batch
            if (state.get("epoch"), state.get("position")) != (epoch, want):
                raise CheckpointError(f"the checkpoint's data position (epoch {state.get('epoch')}, position "
                                      f"{state.get('position')}) is not where step {step} ends (epoch {epoch}, "
                                      f"position {want})")
            try:
                self.sampler.load_state_dict(state)
            except ValueError as e:  # another seed, dataset, mixing or batch size: the order would differ
                raise CheckpointError(f"checkpoint does not fit this run's data: {e}") from None
        self._epoch, self._taken, self._taken_at_open, self._batches = epoch, into * self.accum, into * self.accum, None

    def next_step(self) -> list:
        if self._taken >= self.per_epoch:
            self._epoch, self._taken, self._taken_at_open, self._batches = self._epoch + 1, 0, 0, None
        if self._batches is None:
            self.sampler.set_epoch(self._epoch)  # keeps a position loaded for this epoch
            self.dataset.set_epoch(self._epoch)  # before the iterator: DataLoader workers copy the dataset
            self._batches = iter(self.loader)
        batches = [next(self._batches) for _ in range(self.accum)]
        self._taken += self.accum
        return batches

    def state_dict(self) -> dict:
        """The sampler's state at the stream's position: the next micro-batch to take (at the end
        of an epoch, the start of the next). Counts the batches the loop took, not what workers
        prefetched."""
        if self._taken >= self.per_epoch:
            return {**self.sampler.state_dict(consumed=0), "epoch": self._epoch + 1, "position": 0}
        if self._batches is None:  # nothing taken from this epoch's iterator yet
            return {**self.sampler.state_dict(consumed=0), "epoch": self._epoch,
                    "position": self._taken * self.global_batch}
        # The sampler counts from where this iterator started (mid-epoch after a resume).
        return self.sampler.state_dict(consumed=(self._taken - self._taken_at_open) * self.loader.batch_size)

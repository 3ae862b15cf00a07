"""The map-style dataset the training and validation loaders read: one query with its group of
1 positive + k negatives per item, positive first.

Sampling (better than the reference, which always takes ``pos_doc[0]`` and the first negatives):

* sampled (``sampled=True``, training): for item ``i`` in epoch ``e`` a private ``random.Random`` seeded from
  blake2b(seed, e, i) picks one positive among all positives and ``n_passages - 1`` negatives
  among all negatives: without replacement when there are enough, else the negatives in one
  seeded permutation repeated cyclically (each negative appears ``floor`` or ``ceil`` of
  ``k / len(negatives)`` times). The same (seed, epoch, i) gives the same item in every
  process, so resumed and multi-rank runs agree; no global RNG is touched.
* first in file order (``sampled=False``: validation, and training with ``do_shuffle: false``): deterministic, independent of seed and epoch: the first positive and
  the first ``eval_negative_size`` negatives in file order, repeated cyclically when fewer
  (as the reference does). ``eval_negative_size=None`` means ``n_passages - 1``.

An example with no negatives while k > 0 raises DataError naming its file and line, or, when
the ExampleSet was loaded with ``skip_bad=True`` (or ``skip_bad=True`` is given here), is left
out and counted in ``skipped["no_negatives"]`` (``skipped`` also holds the ExampleSet's own
load-time skip counts, so ``summary()`` is the one line to log).

Note for DataLoader workers: call ``set_epoch`` before creating the epoch's iterator (workers
copy the dataset when the iterator starts, unless persistent_workers, where it would be stale).

Instructions: given ``prefixes`` ({corpus_id or None: (query prefix, passage prefix)}, from
embedcore.data.instructions.dataset_prefixes), every item also carries its dataset's
``"query_prefix"`` and ``"passage_prefix"``, which the collator uses instead of its own.
"""
import hashlib
import random

from embedcore.data.errors import DataError
from embedcore.data.ids import text_key

__all__ = ["RetrievalDataset"]


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed from (seed, epoch, index), the same in every process (hash() is salted)."""
    key = f"{int(seed)}:{int(epoch)}:{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class RetrievalDataset:
    """Items ``{"query", "passages", "passage_uids", "qid"}`` with ``1 + k`` passages, positive first.

    Args:
        examples: an ExampleSet (or any sequence of Example) from load_examples.
        n_passages: train_n_passages, 1 positive + n_passages - 1 negatives (>= 1).
        seed: the sampling seed (combine with the epoch via set_epoch).
        sampled: a seeded random choice of positive and negatives per item and epoch (True), or
            the first ones in file order (False).
        eval_negative_size: negatives per query when sampled=False (None: n_passages - 1).
        skip_bad: leave out examples with no negatives instead of raising (None: take the
            ExampleSet's own skip_bad).
        prefixes: per-dataset prefixes put into every item (see the module docstring); None:
            items carry none and the collator's own prefixes apply (instructions off).
    """

    def __init__(self, examples, n_passages: int, seed: int, sampled: bool = True,
                 eval_negative_size: int | None = None, *, skip_bad: bool | None = None,
                 prefixes: dict | None = None):
        if not isinstance(n_passages, int) or isinstance(n_passages, bool) or n_passages < 1:
            raise ValueError(f"n_passages (train_n_passages) must be an integer >= 1, got {n_passages!r}")
        if eval_negative_size is not None and (not isinstance(eval_negative_size, int) or eval_negative_size < 0):
            raise ValueError(f"eval_negative_size must be an integer >= 0 or None, got {eval_negative_size!r}")
        self.n_passages = n_passages
        self.seed = int(seed)
        self.sampled = bool(sampled)
        self.num_negatives = n_passages - 1 if (sampled or eval_negative_size is None) else eval_negative_size
        self.epoch = 0
        if skip_bad is None:
            skip_bad = bool(getattr(examples, "skip_bad", False))
        # Skips made while reading the files are carried over, so summary() reports them all.
        self.skipped = dict(getattr(examples, "skipped", None) or {})
        kept = []
        for ex in examples:
            if self.num_negatives > 0 and not ex.negatives:
                if not skip_bad:
                    raise DataError(f"{ex.source}: example has no negatives but {self.num_negatives} are needed per "
                                    f"query ({'train_n_passages - 1' if self.sampled else 'eval_negative_size'}); "
                                    f"add neg_doc, mine negatives, or enable skipping", "no_negatives")
                self.skipped["no_negatives"] = self.skipped.get("no_negatives", 0) + 1
                continue
            kept.append(ex)
        if not kept:
            raise DataError(f"no example left after skipping {self.skipped}", "no_examples")
        self.examples = kept
        self.prefixes = prefixes
        if prefixes is not None:
            missing = sorted({str(ex.corpus_id) for ex in kept if ex.corpus_id not in prefixes})
            if missing:
                raise ValueError(f"RetrievalDataset: no prefixes given for dataset(s) {missing}")

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose sampling draws ``__getitem__`` returns (train only)."""
        self.epoch = int(epoch)

    def summary(self) -> str:
        """One line: size and skipped examples."""
        line = f"{len(self)} queries x {1 + self.num_negatives} passages ({'sampled' if self.sampled else 'first in file order'})"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return line

    @property
    def file_indices(self) -> list:
        """The data file (data_dir_list position) of every item, in item order."""
        return [ex.file_index for ex in self.examples]

    def group_keys(self, index: int, epoch: int) -> frozenset:
        """The duplicate keys of item ``index`` as drawn in ``epoch`` (``"q"`` + the query's
        text key, ``"p"`` + each passage's), without touching ``self.epoch``: what the
        no-duplicates sampler keeps apart within a batch."""
        ex, pos, negs = self._choose(index, epoch)
        return frozenset(["q" + text_key(ex.query)] + ["p" + text_key(p.text) for p in (pos, *negs)])

    def _choose(self, index: int, epoch: int | None = None):
        ex = self.examples[index]
        k = self.num_negatives
        if not self.sampled:
            negs = [ex.negatives[j % len(ex.negatives)] for j in range(k)] if k else []
            return ex, ex.positives[0], negs
        rng = random.Random(_item_seed(self.seed, self.epoch if epoch is None else epoch, index))
        pos = ex.positives[rng.randrange(len(ex.positives))]
        if k == 0:
            return ex, pos, []
        m = len(ex.negatives)
        if m >= k:
            negs = rng.sample(ex.negatives, k)
        else:
            perm = rng.sample(ex.negatives, m)
            negs = [perm[j % m] for j in range(k)]
        return ex, pos, negs

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index %= len(self)
        ex, pos, negs = self._choose(index)
        group = [pos, *negs]
        item = {"query": ex.query, "passages": [p.text for p in group],
                "passage_uids": [p.uid for p in group], "qid": ex.qid,
                "passage_scores": [p.score for p in group]}  # teacher scores (None where the data has none)
        if self.prefixes is not None:
            item["query_prefix"], item["passage_prefix"] = self.prefixes[ex.corpus_id]
        return item

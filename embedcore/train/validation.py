"""Validation: val_loss, val_acc1 and val_mrr over each query's own candidate group
(1 positive + eval_negative_size negatives), reduced over all ranks.

Every rank must run the same number of forward passes (FSDP's forward is collective), so the
examples are cut into global batches of batch_size x world; the last one is filled with
repeats that carry weight 0, and each real example is counted exactly once.
"""
from __future__ import annotations

import contextlib

import torch

from embedcore.train.build import batch_to_device
from embedcore.distributed import DistInfo, all_reduce_sum


def validation_batches(length: int, batch_size: int, info: DistInfo):
    """Yields (indices, weights) for this rank: contiguous chunks of global batches of
    batch_size * world positions over 0..length-1; positions past the end wrap with weight 0."""
    G = batch_size * info.world_size
    for start in range(0, length, G):
        lo = start + info.rank * batch_size
        positions = range(lo, lo + batch_size)
        yield [p % length for p in positions], [1.0 if p < length else 0.0 for p in positions]


@torch.no_grad()
def run_validation(model, dataset, collator, batch_size: int, objective, info: DistInfo,
                   autocast=contextlib.nullcontext) -> dict:
    """{"val_loss", "val_acc1", "val_mrr", "val_queries"} over the whole validation set, from the
    objective's per-group metrics (embedcore.train.objective)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, acc1, rr, count
    for indices, weights in validation_batches(len(dataset), batch_size, info):
        batch = batch_to_device(collator([dataset[i] for i in indices]), info.device)
        w = torch.tensor(weights, dtype=torch.float32, device=info.device)
        with autocast():
            q = model.encode(batch["q_input_ids"], batch["q_attention_mask"], "query")
            p = model.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
        losses, ranks = objective.group_metrics(q, batch["q_attention_mask"], p, batch["p_attention_mask"])
        ranks = ranks.float()
        sums += torch.stack([(losses.float() * w).sum(), ((ranks == 1).float() * w).sum(),
                             (w / ranks).sum(), w.sum()]).double()
    all_reduce_sum(sums, info)
    loss, acc1, rr, n = sums.tolist()
    if was_training:
        model.train()
    return {"val_loss": loss / n, "val_acc1": acc1 / n, "val_mrr": rr / n, "val_queries": int(n)}


class Validator:
    """Validation on its own cadence (every `every_steps`, optionally at step 0, and at the end)."""

    def __init__(self, dataset, collator, batch_size: int, objective, info: DistInfo, every_steps: int,
                 at_start: bool, autocast=contextlib.nullcontext):
        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.objective, self.info, self.autocast = objective, info, autocast
        self.every_steps, self.at_start = every_steps, at_start

    def should_run(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def run(self, model) -> dict:
        return run_validation(model, self.dataset, self.collator, self.batch_size, self.objective, self.info,
                              self.autocast)

"""Retrieval evaluation at the end of training (the config's `evaluation:` section).

After the final export the trainer scores the exported folder with
embedcore.evaluate.evaluate_model, exactly what `python -m embedcore.evaluate --model <export>`
computes, and writes one log line and one record in validation.jsonl (RunLogger.evaluation):

    step 184 | epoch 3 | eval ndcg@10 0.4123 | mrr@10 0.3810 | ... | queries 200 | corpus 982

evaluate_model is collective under a process group: every rank calls it (each encodes its share
of the corpus, top-k is merged across ranks) and every rank gets the same numbers; rank 0 logs.
The data is checked when the trainer starts, so a wrong path fails before hours of training.
"""
from __future__ import annotations

import os

from embedcore.train.config import ConfigError, EvaluationConfig


def check_evaluation_data(ev: EvaluationConfig) -> None:
    """Fail fast (ConfigError naming evaluation.data / evaluation.split) when the evaluation data
    is not there. Only the layout is checked; the contents are read at the end of training."""
    if os.path.isdir(ev.data):
        missing = [name for name in ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", f"{ev.split}.tsv"))
                   if not os.path.isfile(os.path.join(ev.data, name))]
        if missing:
            key = "evaluation.split" if missing == [os.path.join("qrels", f"{ev.split}.tsv")] else "evaluation.data"
            raise ConfigError(f"{key}: the BEIR folder {ev.data!r} has no {', '.join(missing)}")
    elif not os.path.isfile(ev.data):
        raise ConfigError(f"evaluation.data: {ev.data!r} not found (a BEIR folder or a .json/.jsonl data file)")


class Evaluator:
    """The end-of-training retrieval evaluation of the export (the config's `evaluation:` section).
    The data's layout is checked when it is built, before any training."""

    def __init__(self, ev: EvaluationConfig):
        check_evaluation_data(ev)
        self.ev = ev

    def run(self, consolidated: str) -> dict:
        """The metrics of the exported folder `consolidated` (collective: every rank calls it and
        gets the same numbers)."""
        from embedcore.evaluate import evaluate_model

        ev = self.ev
        return evaluate_model(consolidated, ev.data, ev.split, metrics=ev.metrics, batch_size=ev.batch_size,
                              max_length=ev.max_length, dtype=ev.dtype)


__all__ = ["check_evaluation_data", "Evaluator"]

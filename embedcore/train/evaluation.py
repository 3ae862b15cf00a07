"""Retrieval evaluation at the end of training (the config's `evaluation:` section).

After the final export the trainer scores the exported folder with
embedcore.evaluate.evaluate_model, exactly what `python -m embedcore.evaluate --model <export>`
computes, and writes one log line and one record in validation.jsonl:

    step 184 | epoch 3 | eval ndcg@10 0.4123 | mrr@10 0.3810 | ... | queries 200 | corpus 982

evaluate_model is collective under a process group: every rank calls it (each encodes its share
of the corpus, top-k is merged across ranks) and every rank gets the same numbers; rank 0 logs.
The data is checked when the trainer starts, so a wrong path fails before hours of training.
"""
from __future__ import annotations

import os

import torch

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


def run_final_evaluation(trainer, consolidated: str) -> dict:
    """Evaluate the exported folder `consolidated` (collective: every rank calls it); log the line
    and append {"step", "epoch", <metrics>, num_queries, num_corpus, model, data, split, seconds}
    to validation.jsonl (rank 0). Returns that record on every rank."""
    from embedcore.evaluate import evaluate_model

    ev, info = trainer.cfg.evaluation, trainer.info
    # The run is over: AdamW's moments (twice the trainable weights) make room for the
    # evaluation's own copy of the model.
    trainer.optimizer.state.clear()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    result = evaluate_model(consolidated, ev.data, ev.split, metrics=ev.metrics, batch_size=ev.batch_size,
                            max_length=ev.max_length, dtype=ev.dtype)
    record = {"step": trainer.step, "epoch": trainer.epoch, **result}
    trainer.logger.evaluation(record, ev.metrics)
    return record


__all__ = ["check_evaluation_data", "run_final_evaluation"]

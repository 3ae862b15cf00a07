"""The trainer behind `python train.py config.yaml` (see examples/quickstart.yaml).

    config/          typed sections of the reference recipe's YAML (schema), the reference-compatibility
                     table and `_target_` mapping (compat), YAML + overrides (loading), checks (validation)
    distributed.py   FSDP2 wrapping (process group, ranks, collectives: embedcore.distributed)
    build.py         model, tokenizer, LoRA, datasets and loaders from the config
    objective.py     the loss: pooled InfoNCE (contrastive_loss) or colbert MaxSim (maxsim_contrastive_loss),
                     global-batch training loss and per-group validation metrics
    optim.py         AdamW and the warmup-then-decay schedule
    loop.py          Trainer / train(): the step, logging, validation and checkpoint cadence
    validation.py    val_loss, val_acc1, val_mrr reduced over ranks
    checkpoint.py    atomic step folders, LATEST, resume (safetensors + JSON, nothing pickled)
    export.py        the final sentence-transformers folder, LoRA adapter and merged export
    evaluation.py    the optional retrieval evaluation of that export at the end (embedcore.evaluate)
    logging.py       the log lines and training.jsonl / validation.jsonl
    cli.py           the command line

Modules are imported on use: `import embedcore.train` is cheap.
"""

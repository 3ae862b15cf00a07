"""Checks of a built TrainConfig that need nothing but the config (and, in `validate_world`, the
number of ranks): each error is a ConfigError naming the key, raised before any model or data
is loaded. Checks that need the data (the training set is smaller than one global batch), the
device (GPU-only fallbacks) or the file system (the evaluation data exists) stay where those
are known.
"""
from __future__ import annotations

import dataclasses
import math

from embedcore.errors import ConfigError
from embedcore.train.config.compat import check_compat, resolve_target
from embedcore.train.config.schema import EVAL_METRIC_KINDS, DatasetConfig, TrainConfig


def _positive(key: str, value, allow_zero=False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_finite_numbers(section, key: str = "") -> None:
    """Every float of the config (and of its lists) is finite: an infinite learning rate or a NaN
    temperature is refused here, naming the key, before any model is built."""
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{key}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite_numbers(value, name + ".")
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, float) and not math.isfinite(v):
                where = f"{name}[{i}]" if isinstance(value, list) else name
                raise ConfigError(f"{where}: must be a finite number, got {v}")


def validate(cfg: TrainConfig) -> None:
    """Checks across keys (each error names the key)."""
    _check_finite_numbers(cfg)
    s = cfg.step_scheduler
    _positive("train_n_passages", cfg.train_n_passages)
    _positive("eval_negative_size", cfg.eval_negative_size, allow_zero=True)
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {cfg.temperature}")
    _positive("step_scheduler.global_batch_size", s.global_batch_size)
    _positive("step_scheduler.local_batch_size", s.local_batch_size)
    _positive("step_scheduler.num_epochs", s.num_epochs)
    _positive("step_scheduler.max_steps", s.max_steps)
    _positive("step_scheduler.log_every_steps", s.log_every_steps)
    _positive("step_scheduler.ckpt_every_steps", s.ckpt_every_steps, allow_zero=True)
    _positive("step_scheduler.val_every_steps", s.val_every_steps, allow_zero=True)
    if not cfg.model.pretrained_model_name_or_path:
        raise ConfigError("model.pretrained_model_name_or_path: required (a local model folder)")
    for section in ("dataloader", "validation_dataloader"):
        dl = getattr(cfg, section)
        if dl is None:
            continue
        if not dl.dataset.data_dir_list:
            raise ConfigError(f"{section}.dataset.data_dir_list: at least one data file is required")
        _positive(f"{section}.batch_size", dl.batch_size)
        _positive(f"{section}.num_workers", dl.num_workers, allow_zero=True)
        _positive(f"{section}.collate_fn.q_max_len", dl.collate_fn.q_max_len)
        _positive(f"{section}.collate_fn.p_max_len", dl.collate_fn.p_max_len)
        _positive(f"{section}.collate_fn.pad_to_multiple_of", dl.collate_fn.pad_to_multiple_of)
        resolve_target(section, dl._target_, "dataloader")
        resolve_target(f"{section}.dataset", dl.dataset._target_)
        resolve_target(f"{section}.collate_fn", dl.collate_fn._target_)
    # The reference's keys (data_type, the repeated train_n_passages, tp_size...): compat.py.
    check_compat(cfg)
    if s.global_batch_size % s.local_batch_size:
        raise ConfigError(f"step_scheduler.global_batch_size: {s.global_batch_size} is not a multiple of "
                          f"step_scheduler.local_batch_size {s.local_batch_size}")
    resolve_target("model", cfg.model._target_)
    resolve_target("tokenizer", cfg.tokenizer._target_)
    resolve_target("optimizer", cfg.optimizer._target_)
    if cfg.peft is not None:
        resolve_target("peft", cfg.peft._target_)
        _positive("peft.dim", cfg.peft.dim)
        if not 0 <= cfg.peft.dropout < 1:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {cfg.peft.dropout}")
        if not cfg.peft.target_modules:
            raise ConfigError("peft.target_modules: at least one module name is required")
    o = cfg.optimizer
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr: must be > 0, got {o.lr}")
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {o.betas}")
    _positive("optimizer.max_grad_norm", o.max_grad_norm)
    _positive("lr_scheduler.lr_warmup_steps", cfg.lr_scheduler.lr_warmup_steps, allow_zero=True)
    _positive("lr_scheduler.lr_decay_steps", cfg.lr_scheduler.lr_decay_steps, allow_zero=True)
    if cfg.lr_scheduler.min_lr < 0 or cfg.lr_scheduler.min_lr > o.lr:
        raise ConfigError(f"lr_scheduler.min_lr: must be in [0, optimizer.lr={o.lr}], got {cfg.lr_scheduler.min_lr}")
    if cfg.dist_env.backend not in ("nccl", "gloo"):
        raise ConfigError(f"dist_env.backend: expected nccl or gloo, got {cfg.dist_env.backend!r}")
    if cfg.checkpoint.restore_from is not None and not cfg.checkpoint.restore_from:
        raise ConfigError("checkpoint.restore_from: empty; use LATEST or a step folder")
    if cfg.evaluation is not None:
        _validate_evaluation(cfg)
    _validate_divergence(cfg)
    _validate_data_mixing(cfg)
    _validate_loss(cfg)
    _positive("train.grad_cache.chunk_size", cfg.train.grad_cache.chunk_size)


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step: global_batch_size / (local_batch_size x world), or a
    ConfigError naming the key when that is not whole."""
    s = cfg.step_scheduler
    per_pass = s.local_batch_size * world
    if s.global_batch_size % per_pass:
        raise ConfigError(
            f"step_scheduler.global_batch_size: {s.global_batch_size} is not a multiple of local_batch_size "
            f"{s.local_batch_size} x {world} rank(s) = {per_pass}"
        )
    return s.global_batch_size // per_pass


def validate_world(cfg: TrainConfig, world: int) -> int:
    """The checks that need the number of ranks (known once the process group is up); returns
    the accumulation steps."""
    dp = cfg.distributed.dp_size
    if isinstance(dp, int) and dp != world:
        raise ConfigError(f"distributed.dp_size: {dp} differs from the {world} rank(s) of this run; every rank "
                          f"is data-parallel here (use none)")
    return accumulation_steps(cfg, world)


def _validate_divergence(cfg: TrainConfig) -> None:
    d = cfg.divergence
    for key in ("loss_spike_factor", "grad_norm_spike_factor"):
        value = getattr(d, key)
        if value is not None and not value > 1:
            raise ConfigError(f"divergence.{key}: must be > 1 (or null: off), got {value}")
    _positive("divergence.max_abs_weight", d.max_abs_weight)


def _validate_data_mixing(cfg: TrainConfig) -> None:
    ds = cfg.dataloader.dataset
    if ds.sampling == "weights":
        w = ds.data_weights
        if w is None or len(w) != len(ds.data_dir_list):
            raise ConfigError(f"dataloader.dataset.data_weights: sampling weights needs one weight per "
                              f"data_dir_list entry ({len(ds.data_dir_list)}), got {w}")
        for i, v in enumerate(w):
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"dataloader.dataset.data_weights[{i}]: must be a finite number >= 0, got {v}")
        if not sum(w) > 0:
            raise ConfigError(f"dataloader.dataset.data_weights: at least one weight must be > 0, got {w}")
    elif ds.data_weights is not None:
        raise ConfigError(f"dataloader.dataset.data_weights: only used with sampling: weights "
                          f"(sampling is {ds.sampling})")
    v = cfg.validation_dataloader
    if v is not None:  # validation reads every example once, in file order: no mixing there
        vd, default = v.dataset, DatasetConfig()
        for key in ("sampling", "data_weights", "homogeneous_batches", "no_duplicates"):
            if getattr(vd, key) != getattr(default, key):
                raise ConfigError(f"validation_dataloader.dataset.{key}: only for training (validation "
                                  f"reads every example once, in file order)")


def _validate_evaluation(cfg: TrainConfig) -> None:
    ev = cfg.evaluation
    if not ev.data:
        raise ConfigError("evaluation.data: required (a BEIR folder or a .json/.jsonl data file)")
    if not ev.split:
        raise ConfigError("evaluation.split: empty; use the name of a qrels file (test, dev, ...)")
    if not ev.metrics:
        raise ConfigError("evaluation.metrics: at least one metric (KIND@K) is required")
    for i, name in enumerate(ev.metrics):
        kind, _, k = name.partition("@")
        if kind not in EVAL_METRIC_KINDS or not k.isdigit() or int(k) < 1:
            raise ConfigError(f"evaluation.metrics[{i}]: {name!r} is not KIND@K with KIND one of "
                              f"{', '.join(EVAL_METRIC_KINDS)} and K >= 1")
    _positive("evaluation.batch_size", ev.batch_size)
    _positive("evaluation.max_length", ev.max_length)
    # It evaluates the exported folder, so that folder has to be written.
    if not cfg.checkpoint.enabled or not cfg.checkpoint.save_consolidated:
        raise ConfigError("evaluation: evaluates the final export; it needs checkpoint.enabled and "
                          "checkpoint.save_consolidated true")
    if cfg.peft is not None and not cfg.checkpoint.export_merged_lora:
        raise ConfigError("evaluation: LoRA runs export a loadable model only with checkpoint.export_merged_lora: true")


def _validate_loss(cfg: TrainConfig) -> None:
    """The loss: section's terms (the prefix lengths are checked against the model's dimension
    when it is built)."""
    L = cfg.loss
    for key in ("symmetric_weight", "distill_weight"):
        _positive(f"loss.{key}", getattr(L, key), allow_zero=True)
    _positive("loss.distill_temperature", L.distill_temperature)
    if L.false_negative_margin is not None and not L.false_negative_margin > 0:
        raise ConfigError(f"loss.false_negative_margin: must be > 0 (a fraction of the positive's cosine, e.g. "
                          f"0.95), got {L.false_negative_margin}")
    _positive("loss.false_negative_delta", L.false_negative_delta, allow_zero=True)
    if L.matryoshka_dims is not None:
        if not L.matryoshka_dims or len(set(L.matryoshka_dims)) != len(L.matryoshka_dims) \
                or any(d < 1 for d in L.matryoshka_dims):
            raise ConfigError(f"loss.matryoshka_dims: expected distinct prefix lengths >= 1, got {L.matryoshka_dims}")
    if L.matryoshka_weights is not None:
        if L.matryoshka_dims is None or len(L.matryoshka_weights) != len(L.matryoshka_dims):
            raise ConfigError(f"loss.matryoshka_weights: one weight per loss.matryoshka_dims entry, got "
                              f"{L.matryoshka_weights} for {L.matryoshka_dims}")
        if any(w < 0 for w in L.matryoshka_weights):
            raise ConfigError(f"loss.matryoshka_weights: must be >= 0, got {L.matryoshka_weights}")
    # What each objective supports (its loss terms, single-vector evaluation) is the objective's to say.
    from embedcore.train.objective import check_objective_config

    check_objective_config(cfg)

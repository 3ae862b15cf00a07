"""Compatibility with the reference recipe's YAML (NeMo AutoModel's biencoder guide).

Two tables, both only so that the guide's config (examples/reference_llama3_2_1b.yaml) runs as
it is:

* `KNOWN_TARGETS`: the `_target_` values naming the reference's classes, each mapped to the name
  of our implementation. Anything else is refused: a config never imports code.
* `COMPAT`: the keys embedcore accepts but does not act on as the reference does. For each, the
  values accepted; a value that cannot be honoured is a ConfigError naming the key
  (`check_compat`, run by validation.validate), and an accepted value that has no effect here is
  a one-line notice (`compat_notices`, printed by the trainer at start).

Settings that do act but fall back on a CPU machine (dist_env.backend nccl, FusedAdam,
model.torch_dtype float16) say so where the device is known (embedcore/distributed.py, train/optim.py,
build.py), not here: this module needs the config only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from embedcore.errors import ConfigError


# --------------------------------------------------------------------------------------------
# _target_ mapping: reference class -> the name of our implementation (never imported by name).
# --------------------------------------------------------------------------------------------
KNOWN_TARGETS: dict[str, dict[str, str]] = {
    "model": {
        "nemo_automodel.NeMoAutoModelBiencoder.from_pretrained": "biencoder",
        "nemo_automodel.components.models.biencoder.NeMoAutoModelBiencoder.from_pretrained": "biencoder",
        "nemo_automodel._transformers.NeMoAutoModelBiencoder.from_pretrained": "biencoder",
        "embedcore.models.biencoder.Biencoder.from_pretrained": "biencoder",
    },
    "tokenizer": {
        "nemo_automodel.NeMoAutoTokenizer.from_pretrained": "auto_tokenizer",
        "nemo_automodel._transformers.NeMoAutoTokenizer.from_pretrained": "auto_tokenizer",
        "transformers.AutoTokenizer.from_pretrained": "auto_tokenizer",
    },
    "dataloader": {
        "torchdata.stateful_dataloader.StatefulDataLoader": "resumable_loader",
        "torch.utils.data.DataLoader": "resumable_loader",
        "embedcore.train.loader.ResumableLoader": "resumable_loader",
    },
    "dataset": {
        "nemo_automodel.components.datasets.llm.make_retrieval_dataset": "retrieval_dataset",
        "nemo_automodel.components.datasets.llm.retrieval_dataset.make_retrieval_dataset": "retrieval_dataset",
        "embedcore.data.dataset.RetrievalDataset": "retrieval_dataset",
    },
    "collate_fn": {
        "nemo_automodel.components.datasets.llm.RetrievalBiencoderCollator": "biencoder_collator",
        "nemo_automodel.components.datasets.llm.retrieval_collator.RetrievalBiencoderCollator": "biencoder_collator",
        "embedcore.data.collator.BiencoderCollator": "biencoder_collator",
    },
    "optimizer": {
        # FusedAdam is a CUDA-only transformer_engine class: torch's AdamW (fused on CUDA) replaces it.
        "transformer_engine.pytorch.optimizers.fused_adam.FusedAdam": "adam",
        "transformer_engine.pytorch.optimizers.FusedAdam": "adam",
        "torch.optim.AdamW": "adamw",
        "torch.optim.Adam": "adam",
    },
    "peft": {
        "nemo_automodel.components._peft.lora.PeftConfig": "lora",
        "nemo_automodel.components._peft.PeftConfig": "lora",
        "embedcore.lora.apply.apply_lora": "lora",
    },
}


def resolve_target(section: str, value: Optional[str], kind: Optional[str] = None) -> Optional[str]:
    """Our implementation's name for a `_target_` value (of `kind`, by default the section's last
    name), or ConfigError naming the key."""
    if value is None:
        return None
    table = KNOWN_TARGETS[kind or section.rsplit(".", 1)[-1]]
    if value not in table:
        raise ConfigError(
            f"{section}._target_: {value!r} is not a known target. A config never imports code; accepted "
            f"values are: {', '.join(sorted(table))}"
        )
    return table[value]


# --------------------------------------------------------------------------------------------
# Keys accepted for the reference's sake.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompatKey:
    key: str
    """The dotted key (skipped when its optional section is absent)."""
    accepted: str
    """The values accepted, in words (documentation and the error text)."""
    why: str
    """What the reference does with the key and what embedcore does instead."""
    accepts: Optional[Callable[[Any], bool]] = None
    """Is the value accepted? Others are a ConfigError (None: any value of the field's type)."""
    same_as: str = ""
    """Accepted: null or the value of this other key (the reference repeats it here)."""
    ignored: Callable[[Any], bool] = lambda value: False
    """Is this accepted value without effect here? Then `notice` is printed at start."""
    notice: str = ""
    """The notice (one line, after the key)."""


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == "none")


COMPAT: tuple[CompatKey, ...] = (
    CompatKey("model.use_liger_kernel", "true or false",
              "the reference patches Liger's GPU kernels in; embedcore's own fused ops always run",
              ignored=lambda v: v is True,
              notice="Liger kernels are not used; embedcore's own fused ops (pool_l2, contrastive_loss, "
                     "lora_linear) take their place"),
    CompatKey("model.use_sdpa_patching", "true or false",
              "the reference patches the attention of its models; transformers' SDPA attention runs as it is",
              ignored=lambda v: v is True,
              notice="no attention patch is applied; transformers' SDPA attention runs as it is"),
    CompatKey("optimizer.master_weights", "true or false",
              "FusedAdam's fp32 copy of low-precision weights; here parameters are always stored in fp32",
              ignored=lambda v: v is False,
              notice="false is ignored; parameters (the master weights) are always stored in fp32 and "
                     "model.torch_dtype sets the compute dtype"),
    CompatKey("optimizer.bias_correction", "true", "torch's Adam always corrects the bias",
              accepts=lambda v: v is True),
    CompatKey("checkpoint.model_save_format", "safetensors",
              "torch_save writes pickles, which embedcore never loads", accepts=lambda v: v == "safetensors"),
    CompatKey("distributed.strategy", "fsdp2", "FSDP2 data parallelism is the only strategy",
              accepts=lambda v: v == "fsdp2"),
    CompatKey("distributed.dp_size", "none, null or the number of ranks (checked at start)",
              "every rank is data-parallel (no tensor or context parallelism)",
              accepts=lambda v: _is_none(v) or (isinstance(v, int) and v >= 1)),
    CompatKey("distributed.tp_size", "1", "tensor parallelism is not implemented", accepts=lambda v: v == 1),
    CompatKey("distributed.cp_size", "1", "context parallelism is not implemented", accepts=lambda v: v == 1),
    CompatKey("distributed.sequence_parallel", "false", "sequence parallelism is not implemented",
              accepts=lambda v: v is False),
    CompatKey("dataloader.dataset.data_type", "train", "the section decides: dataloader is the training data",
              accepts=lambda v: v == "train"),
    CompatKey("validation_dataloader.dataset.data_type", "eval",
              "the section decides: validation_dataloader is the validation data", accepts=lambda v: v == "eval"),
    CompatKey("dataloader.batch_size", "null or step_scheduler.local_batch_size",
              "the training batch per rank is step_scheduler.local_batch_size (drop dataloader.batch_size)",
              same_as="step_scheduler.local_batch_size"),
    *(CompatKey(f"{section}.dataset.{name}", f"null or the top-level {name}", "they must match", same_as=name)
      for section in ("dataloader", "validation_dataloader") for name in ("train_n_passages", "eval_negative_size")),
    # Validation collates in the main process (every rank the same batches, no DataLoader).
    CompatKey("validation_dataloader.num_workers", "any", "validation collates in the main process",
              ignored=lambda v: v > 0, notice="ignored; validation collates its batches in the main process"),
    CompatKey("validation_dataloader.pin_memory", "true or false", "validation collates in the main process",
              ignored=lambda v: v is True, notice="ignored; validation collates its batches in the main process"),
)


def _value_at(cfg, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key; not found when a section on the way is None."""
    node = cfg
    for part in key.split("."):
        if node is None:
            return False, None
        node = getattr(node, part)
    return True, node


def _show(value) -> str:
    """A value as the YAML spells it (true, null, 2, 'torch_save')."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else (repr(value) if isinstance(value, str) else str(value))


def check_compat(cfg) -> None:
    """ConfigError naming the key for a reference key whose value cannot be honoured."""
    for c in COMPAT:
        found, value = _value_at(cfg, c.key)
        if not found:
            continue
        if c.same_as:
            other = _value_at(cfg, c.same_as)[1]
            if value is not None and value != other:
                what = c.same_as if "." in c.same_as else f"the top-level {c.same_as}"
                raise ConfigError(f"{c.key}: {value} differs from {what} {other}; {c.why}")
        elif c.accepts is not None and not c.accepts(value):
            raise ConfigError(f"{c.key}: only {c.accepted} is supported, got {_show(value)} ({c.why})")


def compat_notices(cfg) -> list[str]:
    """One line per reference key whose value has no effect here ("key: what happens instead")."""
    lines = []
    for c in COMPAT:
        found, value = _value_at(cfg, c.key)
        if found and c.ignored(value):
            lines.append(f"{c.key}: {c.notice}")
    return lines


__all__ = ["KNOWN_TARGETS", "resolve_target", "CompatKey", "COMPAT", "check_compat", "compat_notices"]

"""Typed training configuration: the sections and keys of the reference recipe's YAML.

`load_config(path, overrides)` reads a YAML file, applies dotted command-line overrides
(`--step_scheduler.max_steps 20`), and builds `TrainConfig`. Every key is checked:
an unknown key or a value of the wrong type is an error naming the key (`optimizer.lr`).

`_target_` keys name the reference system's classes (NeMo AutoModel, torchdata,
transformer_engine, torch). They are looked up in `KNOWN_TARGETS` and mapped to our own
implementation; anything else is refused. A config never imports code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

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
# Sections. Each field's docstring is the string literal placed under it (read by `describe`).
# --------------------------------------------------------------------------------------------
@dataclass
class StepSchedulerConfig:
    global_batch_size: int = 128
    """Queries per optimizer step over all ranks; accumulation = global / (local * ranks)."""
    local_batch_size: int = 4
    """Queries per rank per forward/backward (micro-batch)."""
    ckpt_every_steps: int = 500
    """Save a checkpoint every this many optimizer steps (0: only at the end)."""
    val_every_steps: int = 500
    """Run validation every this many optimizer steps (0: only at the end)."""
    num_epochs: int = 1
    """Passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (None: num_epochs decides)."""
    log_every_steps: int = 10
    """Print a log line (and read device values back to the host) every this many steps."""
    val_at_start: bool = False
    """Also validate before the first step (a baseline for val_mrr)."""


@dataclass
class DistEnvConfig:
    backend: str = "nccl"
    """Process-group backend: nccl (CUDA) or gloo (CPU). nccl without CUDA falls back to gloo."""
    timeout_minutes: float = 1
    """Collective timeout."""


@dataclass
class TinyModelConfig:
    """Build a small Llama locally (embedcore.models.tiny.make_tiny_llama) when the model folder
    is missing: the quickstart runs on a fresh machine with no downloads."""
    corpus_files: list[str] = field(default_factory=list)
    """Text the tokenizer is trained on (JSONL example files: their queries and passages)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of make_tiny_llama (hidden size, layers, vocabulary size...)."""


@dataclass
class ModelConfig:
    _target_: Optional[str] = "nemo_automodel.NeMoAutoModelBiencoder.from_pretrained"
    """Reference class to build the model; mapped to embedcore's Biencoder."""
    pretrained_model_name_or_path: str = ""
    """Local folder of a Hugging Face or sentence-transformers model (no downloads)."""
    share_encoder: bool = True
    """One encoder for queries and passages (True) or a separate passage encoder (False)."""
    pooling: Literal["avg", "weighted_avg", "cls", "last", "colbert"] = "avg"
    """Pooling of token states into the embedding (colbert: one vector per token, MaxSim)."""
    l2_normalize: bool = True
    """Normalise embeddings to unit length."""
    use_liger_kernel: bool = False
    """Reference flag (GPU Liger kernels); our fused ops are always used, so this is a no-op."""
    use_sdpa_patching: bool = False
    """Reference flag (SDPA patching); transformers' SDPA attention is used as it is."""
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Compute dtype. Master weights stay fp32; bf16 runs through FSDP mixed precision on CUDA,
    autocast otherwise."""
    build_tiny_if_missing: Optional[TinyModelConfig] = None
    """When set and pretrained_model_name_or_path does not exist, build a tiny Llama there."""


@dataclass
class TokenizerConfig:
    _target_: Optional[str] = "nemo_automodel.NeMoAutoTokenizer.from_pretrained"
    """Reference class to build the tokenizer; mapped to transformers.AutoTokenizer."""
    pretrained_model_name_or_path: Optional[str] = None
    """Tokenizer folder (None: the model's folder)."""


@dataclass
class DatasetConfig:
    _target_: Optional[str] = "nemo_automodel.components.datasets.llm.make_retrieval_dataset"
    """Reference dataset factory; mapped to embedcore.data.dataset.RetrievalDataset."""
    data_dir_list: list[str] = field(default_factory=list)
    """Data files: inline-text JSONL or corpus-ID JSON (a single string is accepted too)."""
    data_type: Literal["train", "eval"] = "train"
    """train: 1 positive + train_n_passages-1 negatives; eval: 1 positive + eval_negative_size."""
    train_n_passages: Optional[int] = None
    """Must match the top-level train_n_passages (None: take it from there)."""
    eval_negative_size: Optional[int] = None
    """Must match the top-level eval_negative_size (None: take it from there)."""
    seed: Optional[int] = None
    """Seed of the per-epoch choice of positives and negatives (None: the top-level seed)."""
    do_shuffle: bool = True
    """Training: draw the positive and negatives of each example at random per epoch (seeded);
    false: the reference's fixed choice (first positive, first negatives, cyclically)."""
    skip_bad_examples: bool = False
    """Skip (and count) malformed examples instead of stopping with an error."""
    # --- data mixing, instructions, no duplicates (issue 17) ---
    use_instructions: bool = False
    """Apply each corpus's query_instruction / passage_instruction (merlin_metadata.json) as its
    prefix: it overrides collate_fn.query_prefix / passage_prefix, or fills their {task} when
    they are templates ("Instruct: {task}\nQuery:"); see embedcore.data.instructions."""
    sampling: Literal["proportional", "round_robin", "weights"] = "proportional"
    """Training, several data files: how much each file feeds an epoch (always N // global
    batch batches). proportional: by size (with homogeneous_batches false: the plain shuffle);
    round_robin: equal turns; weights: by data_weights. See embedcore.data.mixing."""
    data_weights: Optional[list[float]] = None
    """sampling: weights: one share (>= 0, not all 0) per data_dir_list entry."""
    homogeneous_batches: bool = False
    """Training: every global batch (all ranks) from one data file, so in-batch negatives are
    of the same task."""
    no_duplicates: bool = False
    """Training: keep a query's text, positive and negatives out of the other queries' slots of
    its global batch (as sentence-transformers' NoDuplicatesBatchSampler); a duplicate no
    candidate nearby can avoid is kept (and masked by passage id) and counted in the log."""


@dataclass
class CollatorConfig:
    _target_: Optional[str] = "nemo_automodel.components.datasets.llm.RetrievalBiencoderCollator"
    """Reference collator; mapped to embedcore.data.collator.BiencoderCollator."""
    q_max_len: int = 512
    """Queries are truncated (right) to this many tokens."""
    p_max_len: int = 512
    """Passages are truncated (right) to this many tokens."""
    query_prefix: str = "query:"
    """Text before each query (joined with one space)."""
    passage_prefix: str = "passage:"
    """Text before each passage (joined with one space)."""
    pad_to_multiple_of: Optional[int] = 8
    """Pad sequence lengths up to a multiple of this."""


@dataclass
class DataLoaderConfig:
    _target_: Optional[str] = "torchdata.stateful_dataloader.StatefulDataLoader"
    """Reference loader; mapped to our resumable loader (position saved in checkpoints)."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """The dataset factory's arguments."""
    collate_fn: CollatorConfig = field(default_factory=CollatorConfig)
    """The collator's arguments."""
    batch_size: Optional[int] = None
    """Queries per batch (training: step_scheduler.local_batch_size decides; validation: 2...)."""
    shuffle: bool = True
    """Shuffle the order of examples each epoch (seeded; reproducible on resume)."""
    num_workers: int = 0
    """Worker processes that collate batches (0: in the main process)."""
    pin_memory: bool = False
    """Pin host memory of batches (CUDA only)."""
    drop_last: bool = True
    """Drop a last incomplete batch (training always does: every step sees a full global batch)."""


@dataclass
class OptimizerConfig:
    _target_: Optional[str] = "torch.optim.AdamW"
    """FusedAdam (transformer_engine) or torch.optim.AdamW/Adam; all run as torch AdamW/Adam,
    fused where the device offers it."""
    lr: float = 5.0e-6
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW); L2 decay when adam_w_mode is false."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1.0e-8
    """Adam epsilon."""
    adam_w_mode: bool = True
    """FusedAdam's switch between AdamW (true) and Adam with L2 decay (false)."""
    bias_correction: bool = True
    """Adam bias correction (torch's Adam always corrects; false is refused)."""
    master_weights: bool = True
    """Keep fp32 master weights (always the case here: parameters are stored in fp32)."""
    fused: Optional[bool] = None
    """Use torch's fused Adam kernel (None: on CUDA yes, on CPU no)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this (None: no clipping; the norm is still logged)."""


@dataclass
class LRSchedulerConfig:
    lr_warmup_steps: int = 0
    """Linear warmup from 0 to optimizer.lr over this many steps."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to min_lr at the last step."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_steps: Optional[int] = None
    """Steps of decay after warmup (None: until the last step)."""


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """Save checkpoints (folders per step, LATEST pointer) and the final export."""
    checkpoint_dir: str = "./output/checkpoints"
    """Folder of the step folders, LATEST, training.jsonl and validation.jsonl."""
    model_save_format: Literal["safetensors"] = "safetensors"
    """Weights are always safetensors (torch_save is refused: pickles are not loaded)."""
    save_consolidated: bool = True
    """At the end, export a Hugging Face / sentence-transformers folder (model/consolidated)."""
    restore_from: Optional[str] = None
    """Resume from LATEST (in checkpoint_dir) or from a step folder path."""
    export_merged_lora: bool = False
    """LoRA runs: also export the model with the adapter merged (model/merged)."""
    save_on_interrupt: bool = True
    """On SIGINT / SIGTERM: finish the step in flight, save a checkpoint, exit 130 / 143."""


@dataclass
class DistributedConfig:
    strategy: Literal["fsdp2"] = "fsdp2"
    """fsdp2: every transformer block then the root fully_shard-ed (with several ranks)."""
    dp_size: Optional[Union[int, str]] = None
    """Data-parallel size (none/None: every rank)."""
    tp_size: int = 1
    """Tensor parallelism: only 1 is supported."""
    cp_size: int = 1
    """Context parallelism: only 1 is supported."""
    sequence_parallel: bool = False
    """Only false is supported."""


@dataclass
class PeftConfig:
    _target_: Optional[str] = "nemo_automodel.components._peft.lora.PeftConfig"
    """Reference PEFT config; mapped to embedcore.lora.apply.apply_lora."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (last component or glob) of the linear layers that get LoRA."""
    dim: int = 8
    """LoRA rank r."""
    alpha: float = 32
    """LoRA alpha (scaling = alpha / dim)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    use_triton: bool = True
    """Use the fused lora_linear op (on CPU its C++ kernel; the flag keeps the reference's name)."""


# The metrics of `python -m embedcore.evaluate` (embedcore.retrieval.metrics.DEFAULT_METRICS; a
# test checks they agree). Spelled out here so that reading a config does not import torch.
DEFAULT_EVAL_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")
EVAL_METRIC_KINDS = ("ndcg", "mrr", "recall", "map", "accuracy", "precision")


@dataclass
class EvaluationConfig:
    """Full-corpus retrieval evaluation of the final export (embedcore.evaluate.evaluate_model)
    after training: one log line and one record in validation.jsonl. Needs the consolidated
    export (checkpoint.save_consolidated; LoRA runs: checkpoint.export_merged_lora)."""
    data: str = ""
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), a corpus-ID JSON or an
    inline JSONL data file: what `python -m embedcore.evaluate --data` accepts."""
    split: str = "test"
    """BEIR qrels split (qrels/<split>.tsv); ignored for our data files."""
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_METRICS))
    """KIND@K names, KIND one of ndcg, mrr, recall, map, accuracy, precision."""
    batch_size: int = 128
    """Texts per forward pass while encoding the corpus and the queries."""
    max_length: Optional[int] = None
    """Token limit (None: the export's max_seq_length, the larger of q_max_len and p_max_len)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the evaluated model's weights and compute."""


@dataclass
class DivergenceConfig:
    """Guards that stop a run before a blown-up state becomes a checkpoint (embedcore.train.guards).
    A NaN/inf loss or gradient norm always stops the run; these catch finite blow-ups too."""
    loss_spike_factor: Optional[float] = 10.0
    """Stop when the largest loss since the last log step exceeds this times the median of the
    earlier intervals' largest losses (after 3 intervals; null: off)."""
    grad_norm_spike_factor: Optional[float] = 100.0
    """The same rule for the gradient norm before clipping (null: off)."""
    max_abs_weight: Optional[float] = 1.0e4
    """Refuse to save (and stop) when a trainable weight is larger than this in magnitude (null: off)."""


@dataclass
class TrainConfig:
    seed: int = 42
    """Seed of model init, sampling, dropout."""
    train_n_passages: int = 5
    """Passages per training query: 1 positive + train_n_passages-1 hard negatives."""
    eval_negative_size: int = 4
    """Negatives per query at validation (candidate group = 1 + eval_negative_size)."""
    temperature: float = 0.02
    """Scores are divided by this before the softmax."""
    step_scheduler: StepSchedulerConfig = field(default_factory=StepSchedulerConfig)
    """Batch sizes, epochs, steps, how often to validate, checkpoint and log."""
    dist_env: DistEnvConfig = field(default_factory=DistEnvConfig)
    """Process-group backend and timeout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The biencoder."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer."""
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    """Training data."""
    validation_dataloader: Optional[DataLoaderConfig] = None
    """Validation data (optional)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW."""
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    """Warmup then decay."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and export."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Parallelism."""
    peft: Optional[PeftConfig] = None
    """LoRA (optional): only adapter weights are trained."""
    evaluation: Optional[EvaluationConfig] = None
    """Retrieval evaluation of the export at the end of training (optional)."""
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """When a run counts as diverged (stopped, nothing saved)."""


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the key.
# --------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """value checked against (and converted to) the type hint tp; ConfigError naming key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own error names the inner key (peft.dim, not peft)
            return _convert(value, others[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [str(value)]  # data_dir_list: a single path is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this file, not in the config


def build_section(cls, data, key: str = ""):
    """An instance of dataclass `cls` from a mapping; unknown keys and wrong types raise."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping (section), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys{' of ' + key if key else ''}: {', '.join(names)})"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Dotted overrides.
# --------------------------------------------------------------------------------------------
def _field_type(cls, parts: list[str], key: str):
    """The type hint of a dotted key, walking through (Optional) sections."""
    tp = cls
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is Any:
                return Any  # free-form mapping (e.g. build_tiny_if_missing.options)
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            section = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{key}: unknown key {part!r} in {section} (known: {', '.join(hints)})")
        tp = hints[part]
    return tp


def _strip_optional(tp):
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_override_value(text: str, tp):
    """A command-line string as a value for a field of type tp (YAML syntax; strings stay as typed)."""
    if _strip_optional(tp) is str and text.lower() not in ("null", "~"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """`--a.b value` / `--a.b=value` command-line words as (dotted key, value text) pairs."""
    pairs, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --dotted.key value")
        if "=" in arg:
            pairs.append(tuple(arg[2:].split("=", 1)))
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override {arg}: missing a value")
            pairs.append((arg[2:], overrides[i + 1]))
            i += 2
    return pairs


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--a.b.c value` (or `--a.b.c=value`) pairs to the raw mapping `data` (in place)."""
    for key, text in split_overrides(overrides):
        parts = key.split(".")
        tp = _field_type(TrainConfig, parts, key)
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: cannot set a key inside a non-mapping value")
        node[parts[-1]] = parse_override_value(text, tp)
    return data


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------
def config_from_dict(data: dict) -> TrainConfig:
    """TrainConfig from a raw mapping, with the cross-section checks."""
    cfg = build_section(TrainConfig, data)
    validate(cfg)
    return cfg


def load_config(path: str, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read the YAML config at `path`, apply dotted overrides, check and build it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data)


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
        ds = dl.dataset
        if not ds.data_dir_list:
            raise ConfigError(f"{section}.dataset.data_dir_list: at least one data file is required")
        if ds.train_n_passages is not None and ds.train_n_passages != cfg.train_n_passages:
            raise ConfigError(
                f"{section}.dataset.train_n_passages: {ds.train_n_passages} differs from the top-level "
                f"train_n_passages {cfg.train_n_passages}; they must match"
            )
        if ds.eval_negative_size is not None and ds.eval_negative_size != cfg.eval_negative_size:
            raise ConfigError(
                f"{section}.dataset.eval_negative_size: {ds.eval_negative_size} differs from the top-level "
                f"eval_negative_size {cfg.eval_negative_size}; they must match"
            )
        _positive(f"{section}.batch_size", dl.batch_size)
        _positive(f"{section}.num_workers", dl.num_workers, allow_zero=True)
        _positive(f"{section}.collate_fn.q_max_len", dl.collate_fn.q_max_len)
        _positive(f"{section}.collate_fn.p_max_len", dl.collate_fn.p_max_len)
        _positive(f"{section}.collate_fn.pad_to_multiple_of", dl.collate_fn.pad_to_multiple_of)
        resolve_target(section, dl._target_, "dataloader")
        resolve_target(f"{section}.dataset", ds._target_)
        resolve_target(f"{section}.collate_fn", dl.collate_fn._target_)
    if cfg.validation_dataloader is not None and cfg.validation_dataloader.dataset.data_type != "eval":
        raise ConfigError("validation_dataloader.dataset.data_type: must be eval")
    if cfg.dataloader.dataset.data_type != "train":
        raise ConfigError("dataloader.dataset.data_type: must be train")
    if cfg.dataloader.batch_size is not None and cfg.dataloader.batch_size != s.local_batch_size:
        raise ConfigError(f"dataloader.batch_size: {cfg.dataloader.batch_size} differs from "
                          f"step_scheduler.local_batch_size {s.local_batch_size}; the training batch per rank is "
                          f"step_scheduler.local_batch_size (drop dataloader.batch_size)")
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
    if not o.bias_correction:
        raise ConfigError("optimizer.bias_correction: false is not supported (torch's Adam always corrects)")
    _positive("optimizer.max_grad_norm", o.max_grad_norm)
    _positive("lr_scheduler.lr_warmup_steps", cfg.lr_scheduler.lr_warmup_steps, allow_zero=True)
    _positive("lr_scheduler.lr_decay_steps", cfg.lr_scheduler.lr_decay_steps, allow_zero=True)
    if cfg.lr_scheduler.min_lr < 0 or cfg.lr_scheduler.min_lr > o.lr:
        raise ConfigError(f"lr_scheduler.min_lr: must be in [0, optimizer.lr={o.lr}], got {cfg.lr_scheduler.min_lr}")
    d = cfg.distributed
    if d.tp_size != 1:
        raise ConfigError(f"distributed.tp_size: only 1 is supported, got {d.tp_size}")
    if d.cp_size != 1:
        raise ConfigError(f"distributed.cp_size: only 1 is supported, got {d.cp_size}")
    if d.sequence_parallel:
        raise ConfigError("distributed.sequence_parallel: only false is supported")
    if isinstance(d.dp_size, str) and d.dp_size.lower() != "none":
        raise ConfigError(f"distributed.dp_size: expected an integer or none, got {d.dp_size!r}")
    if cfg.dist_env.backend not in ("nccl", "gloo"):
        raise ConfigError(f"dist_env.backend: expected nccl or gloo, got {cfg.dist_env.backend!r}")
    if cfg.checkpoint.restore_from is not None and not cfg.checkpoint.restore_from:
        raise ConfigError("checkpoint.restore_from: empty; use LATEST or a step folder")
    if cfg.evaluation is not None:
        _validate_evaluation(cfg)
    _validate_divergence(cfg)
    _validate_data_mixing(cfg)


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
    if cfg.model.pooling == "colbert":
        raise ConfigError("evaluation: model.pooling colbert (multi-vector) cannot be evaluated by single-vector "
                          "retrieval; remove the evaluation section")


def field_docs(cls) -> dict[str, str]:
    """{field name: docstring} of a config dataclass, read from the string under each field."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def to_dict(cfg) -> dict:
    """The config as plain data (for the checkpoint's state.json)."""
    return dataclasses.asdict(cfg)

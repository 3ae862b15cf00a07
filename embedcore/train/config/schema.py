"""The typed training config: one dataclass per section of the reference recipe's YAML.

Each field's docstring (the string literal under it) is its documentation; tests/test_config.py
checks that every field has one. Keys that exist only so that the reference's YAML runs as it is
are described once more, with the values accepted and the notice printed, in compat.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


@dataclass
class StepSchedulerConfig:
    global_batch_size: int = 128
    """Queries per optimizer step, counted over all ranks and all accumulation micro-steps:
    global_batch_size = local_batch_size x ranks x accumulation steps. It must be a multiple of
    local_batch_size x ranks; the quotient is the number of micro-batches accumulated per step.
    (The data samplers' `global_batch_size` argument is one micro-step over all ranks, local x
    ranks: a different quantity.)"""
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
    """Reference flag (GPU Liger kernels); our fused ops are always used, so true is ignored with
    a notice (compat.py)."""
    use_sdpa_patching: bool = False
    """Reference flag (SDPA patching); transformers' SDPA attention is used as it is, so true is
    ignored with a notice (compat.py)."""
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
    """train: 1 positive + train_n_passages-1 negatives; eval: 1 positive + eval_negative_size.
    Reference key: the section decides (dataloader: train, validation_dataloader: eval)."""
    train_n_passages: Optional[int] = None
    """Reference key: must match the top-level train_n_passages (None: take it from there)."""
    eval_negative_size: Optional[int] = None
    """Reference key: must match the top-level eval_negative_size (None: take it from there)."""
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
    """Queries per batch per rank. Validation: this (None: step_scheduler.local_batch_size);
    training: step_scheduler.local_batch_size decides (None or the same value)."""
    shuffle: bool = True
    """Shuffle the order of examples each epoch (seeded; reproducible on resume)."""
    num_workers: int = 0
    """Worker processes that collate training batches (0: in the main process; validation
    always collates in the main process)."""
    pin_memory: bool = False
    """Pin host memory of training batches (CUDA only)."""


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
    """Reference key: Adam bias correction (torch's Adam always corrects; false is refused)."""
    master_weights: bool = True
    """Reference key: keep fp32 master weights (always the case here: parameters are stored in
    fp32), so false is ignored with a notice."""
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
    """Reference key: weights are always safetensors (torch_save is refused: pickles are not loaded)."""
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
    """fsdp2 (the only one): every transformer block then the root fully_shard-ed (with several ranks)."""
    dp_size: Optional[Union[int, str]] = None
    """Reference key: data-parallel size; every rank is data-parallel, so none/null or the number
    of ranks."""
    tp_size: int = 1
    """Reference key: tensor parallelism, only 1."""
    cp_size: int = 1
    """Reference key: context parallelism, only 1."""
    sequence_parallel: bool = False
    """Reference key: sequence parallelism, only false."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward instead of keeping them
    (applied before FSDP sharding): memory for long sequences, about one extra forward per step."""


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
class LossConfig:
    """Loss terms beside the InfoNCE of queries over every passage of the global batch; each is
    off by default, so a config without this section trains as before. Pooled models only."""
    symmetric_weight: float = 0.0
    """Weight of the passage-to-query InfoNCE (each query's positive against every query of the
    global batch, as sentence-transformers' MultipleNegativesSymmetricRankingLoss); 0: off."""
    matryoshka_dims: Optional[list[int]] = None
    """Prefix lengths of the embedding, e.g. [1024, 512, 256, 128, 64]: the InfoNCE of each prefix,
    L2-normalised on its own, summed in one pass over the score tiles (MatryoshkaLoss); None: off."""
    matryoshka_weights: Optional[list[float]] = None
    """One weight per matryoshka_dims entry (default all 1)."""
    false_negative_margin: Optional[float] = None
    """Leave out of a query's denominator every candidate whose cosine exceeds margin x the
    positive's (NV-Retriever's TopK-PercPos, in-batch; e.g. 0.95); counted as fn_masked in the log."""
    false_negative_delta: Optional[float] = None
    """The same with an absolute gap: cosine above the positive's minus delta (TopK-MarginPos)."""
    distill_weight: float = 0.0
    """Weight of KL(teacher || student) over each query's own group, the teacher's scores read from
    the training data (`score` on every positive and negative); 0: off."""
    distill_temperature: float = 1.0
    """The teacher's scores are divided by this before their softmax."""


@dataclass
class GradCacheConfig:
    chunk_size: Optional[int] = None
    """Cached (GradCache) encoding: embed queries and passages chunk_size sequences at a time,
    without grad, compute the loss and its gradient w.r.t. the embeddings, then re-encode chunk by
    chunk with grad (dropout replayed) and back-propagate: encoder memory bounded by the chunk,
    not by batch x passages, for about one extra forward per step. None: off (one pass)."""


@dataclass
class TrainSectionConfig:
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    """Cached encoding for global batches beyond memory."""


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
    loss: LossConfig = field(default_factory=LossConfig)
    """Optional loss terms (symmetric, Matryoshka, false-negative filter, distillation)."""
    train: TrainSectionConfig = field(default_factory=TrainSectionConfig)
    """How a step is computed (cached encoding)."""


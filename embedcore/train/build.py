"""Build the run's pieces from the config: model, tokenizer, datasets, loaders, LoRA.

The `_target_` values of the config name the reference system's classes; they were checked
by config.validate and map to the embedcore pieces built here (no dynamic import).
"""
from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader

from embedcore.train.config import ConfigError, DataLoaderConfig, ModelConfig, TrainConfig
from embedcore.distributed import DistInfo, barrier
from embedcore.dtypes import DTYPES
from embedcore.errors import DataError

log = logging.getLogger(__name__)



def compute_dtype(cfg: ModelConfig, device: torch.device, notice=log.warning) -> torch.dtype:
    """The dtype of the forward pass (master weights stay fp32)."""
    if cfg.torch_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[cfg.torch_dtype]
    if dtype == torch.float16 and device.type != "cuda":
        notice("model.torch_dtype: float16 needs CUDA; computing in bfloat16 on CPU")
        return torch.bfloat16
    return dtype


def maybe_build_tiny_model(cfg: TrainConfig, info: DistInfo) -> None:
    """Quickstart path: make a tiny Llama (and its tokenizer) in the model folder when it is missing."""
    tiny = cfg.model.build_tiny_if_missing
    path = cfg.model.pretrained_model_name_or_path
    if tiny is None or os.path.isdir(path):
        return
    if info.is_main:
        from embedcore.data.formats import load_examples
        from embedcore.models.tiny import make_tiny_llama

        files = tiny.corpus_files or cfg.dataloader.dataset.data_dir_list
        examples = load_examples(files, skip_bad=True)
        texts = []
        for ex in examples:
            texts.append(ex.query)
            texts.extend(p.text for p in ex.positives)
            texts.extend(p.text for p in ex.negatives)
        log.info("model.build_tiny_if_missing: building a tiny Llama in %s (tokenizer trained on %d texts)",
                 path, len(texts))
        make_tiny_llama(path, texts, seed=cfg.seed, **tiny.options)
    barrier(info)


def build_model(cfg: TrainConfig):
    """The Biencoder in fp32 (master weights), from a local folder."""
    from embedcore.models.biencoder import Biencoder

    m = cfg.model
    return Biencoder.from_pretrained(m.pretrained_model_name_or_path, share_encoder=m.share_encoder,
                                     pooling=m.pooling, l2_normalize=m.l2_normalize, torch_dtype=torch.float32)


def build_tokenizer(cfg: TrainConfig, model):
    """The tokenizer of the model folder (or tokenizer.pretrained_model_name_or_path), with the
    model's padding side (left for decoders) and a pad token (EOS when missing)."""
    from embedcore.models.backbone import load_tokenizer

    path = cfg.tokenizer.pretrained_model_name_or_path or cfg.model.pretrained_model_name_or_path
    return load_tokenizer(path, padding_side=model.padding_side)


def apply_peft(cfg: TrainConfig, model) -> dict:
    """LoRA on the target modules of every encoder; everything else frozen. Returns apply_lora's summary."""
    from embedcore.lora.apply import apply_lora

    p = cfg.peft
    # use_triton (the reference's flag) means the fused lora_linear op with its device default
    # (Triton on CUDA, C++ on CPU); false runs the plain torch reference.
    return apply_lora(model, target_modules=list(p.target_modules), r=p.dim, alpha=p.alpha, dropout=p.dropout,
                      backend=None if p.use_triton else "torch")


def build_dataset(cfg: TrainConfig, dl: DataLoaderConfig, train: bool):
    """RetrievalDataset of the section's files. Training groups: 1 positive + train_n_passages-1
    negatives, drawn per epoch (do_shuffle true) or the reference's fixed choice (do_shuffle false);
    validation groups: 1 positive + eval_negative_size negatives in file order."""
    from embedcore.data.dataset import RetrievalDataset
    from embedcore.data.formats import load_examples

    ds = dl.dataset
    examples = load_examples(list(ds.data_dir_list), skip_bad=ds.skip_bad_examples)
    if train and cfg.loss.distill_weight:
        require_teacher_scores(examples)
    seed = cfg.seed if ds.seed is None else ds.seed
    prefixes = dataset_prefixes_of(dl, examples)
    if train and ds.do_shuffle:
        dataset = RetrievalDataset(examples, n_passages=cfg.train_n_passages, seed=seed, sampled=True,
                                   prefixes=prefixes)
    elif train:  # the reference's choice: first positive, first negatives cyclically
        dataset = RetrievalDataset(examples, n_passages=cfg.train_n_passages, seed=seed, sampled=False,
                                   eval_negative_size=cfg.train_n_passages - 1, prefixes=prefixes)
    else:
        dataset = RetrievalDataset(examples, n_passages=cfg.train_n_passages, seed=seed, sampled=False,
                                   eval_negative_size=cfg.eval_negative_size, prefixes=prefixes)
    if prefixes is not None:
        for cid, (qp, pp) in prefixes.items():
            log.info("%s: instructions: %s -> query prefix %r, passage prefix %r",
                     "dataloader" if train else "validation_dataloader",
                     "inline data" if cid is None else f"corpus {cid!r}", qp, pp)
    log.info("%s: %s", "dataloader" if train else "validation_dataloader", dataset.summary())
    return dataset


def require_teacher_scores(examples) -> None:
    """Score distillation needs the teacher's score of every positive and negative: a missing one
    is an error naming the example's file and line, never a silent zero."""
    for ex in examples:
        for key, group in (("pos_doc", ex.positives), ("neg_doc", ex.negatives)):
            missing = [k for k, p in enumerate(group) if p.score is None]
            if missing:
                raise DataError(f"{ex.source}: loss.distill_weight needs a teacher \"score\" on every positive and "
                                f"negative; {key}[{missing[0]}] has none", "missing_score")


def dataset_prefixes_of(dl: DataLoaderConfig, examples) -> dict | None:
    """{corpus_id: (query prefix, passage prefix)} under dataset.use_instructions (the rule of
    embedcore.data.instructions), or None when it is off (the collator's prefixes apply)."""
    from embedcore.data.instructions import dataset_prefixes

    if not dl.dataset.use_instructions:
        return None
    return dataset_prefixes(examples, dl.collate_fn.query_prefix, dl.collate_fn.passage_prefix)


def export_prompts(cfg: TrainConfig, train_set) -> tuple:
    """(query prefix, passage prefix, {prompt name: prefix}) for the export: what training fed
    (embedcore.data.instructions.export_prompts; the configured prefixes when instructions are off)."""
    from embedcore.data.instructions import export_prompts as prompts_of

    c = cfg.dataloader.collate_fn
    return prompts_of(getattr(train_set, "prefixes", None), c.query_prefix, c.passage_prefix)


def build_collator(dl: DataLoaderConfig, tokenizer):
    from embedcore.data.collator import BiencoderCollator

    c = dl.collate_fn
    return BiencoderCollator(tokenizer, q_max_len=c.q_max_len, p_max_len=c.p_max_len, query_prefix=c.query_prefix,
                             passage_prefix=c.passage_prefix, pad_to_multiple_of=c.pad_to_multiple_of)


def build_train_loader(cfg: TrainConfig, dataset, collator, info: DistInfo):
    """(DataLoader, ResumableSampler): rank r takes its contiguous chunk of every global batch of
    local_batch_size x world examples, so the split does not change the global batches."""
    from embedcore.data.sampler import ResumableSampler

    dl, L = cfg.dataloader, cfg.step_scheduler.local_batch_size  # config.validate checked batch_size == L
    ds = dl.dataset
    seed = cfg.seed if ds.seed is None else ds.seed
    if ds.sampling != "proportional" or ds.homogeneous_batches or ds.no_duplicates:
        from embedcore.data.mixing import MixingSampler

        try:
            sampler = MixingSampler(dataset.file_indices, num_replicas=info.world_size, rank=info.rank,
                                    shuffle=dl.shuffle, seed=seed, batch_over_ranks=L * info.world_size,
                                    sampling=ds.sampling, weights=ds.data_weights,
                                    homogeneous=ds.homogeneous_batches,
                                    keys_of=dataset.group_keys if ds.no_duplicates else None,
                                    num_datasets=len(ds.data_dir_list))
        except ValueError as e:
            raise ConfigError(f"dataloader.dataset: {e}") from None
        if info.is_main:
            shares = sum(sampler.shares)
            log.info("dataloader: sampling %s%s%s: %s", ds.sampling,
                     ", homogeneous batches" if ds.homogeneous_batches else "",
                     ", no duplicates" if ds.no_duplicates else "",
                     "; ".join(f"{path}: {n} examples, {100 * w / shares:.1f}% of each epoch"
                               for path, n, w in zip(ds.data_dir_list, sampler.sizes, sampler.shares)))
    else:  # the plain order (bit-identical to runs before mixing existed)
        sampler = ResumableSampler(len(dataset), num_replicas=info.world_size, rank=info.rank, shuffle=dl.shuffle,
                                   seed=seed, drop_last=True, batch_over_ranks=L * info.world_size)
    # A private generator: creating an iterator then draws its worker seed from it, not from the
    # global RNG (whose state is checkpointed for dropout and must not depend on when iterators start).
    loader = DataLoader(dataset, batch_size=L, sampler=sampler, collate_fn=collator, num_workers=dl.num_workers,
                        pin_memory=dl.pin_memory and info.device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def batch_to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

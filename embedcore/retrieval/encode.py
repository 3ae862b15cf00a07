"""Batched encoding of many texts with a model's own pooling, normalisation and prefixes.

Texts are sorted by length (longest first, so the peak memory shows in the first batch) and cut
into batches; padding is then mostly within texts of similar length, which is where the speed
comes from. The batch plan depends only on the texts and the batch size, so under torchrun each
rank runs every world_size-th batch of the same plan: a text lands in the same batch, padded the
same way, whatever the number of ranks, and its embedding is the same bit for bit.

Prefixes are joined as in training (embedcore.data.collator): prefix + " " + text.
"""
from __future__ import annotations

import sys

import torch

from embedcore import distributed as D


def length_sorted_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` cut into batches, longest text first (stable among equal lengths)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def tokenize(tokenizer, texts: list[str], max_length: int, prefix: str | None, pad_to_multiple_of: int | None = None):
    """input_ids / attention_mask of `texts`, prefixed, truncated and padded by the training collator's rule."""
    from embedcore.data.collator import encode_texts as collator_encode

    return collator_encode(tokenizer, texts, max_length, prefix or "", pad_to_multiple_of)


@torch.inference_mode()
def encode_texts(
    model,
    texts: list[str],
    *,
    kind: str,
    batch_size: int = 128,
    max_length: int = 512,
    prefix: str | None = None,
    pad_to_multiple_of: int | None = None,
    sharded: bool = False,
    progress: bool | None = None,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed `texts`; returns (indices [n], embeddings [n, D] float32 on the model's device).

    model: an embedcore.retrieval.model.RetrievalModel (tokenizer, device, embed(ids, mask, kind)).
    kind: "query" or "passage" (picks the encoder when query and passage encoders differ).
    sharded: under torch.distributed run only this rank's batches (every world_size-th of the
    length-sorted plan); the returned indices say which texts those are. Otherwise all texts,
    indices 0..n-1 in order.
    """
    if kind not in ("query", "passage"):
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    batches = length_sorted_batches(texts, batch_size)
    if sharded:
        batches = batches[D.rank()::D.world_size()]
    bar = _bar(sum(len(b) for b in batches), progress, desc or f"encoding {kind}s")
    idx_parts, emb_parts = [], []
    for batch in batches:
        enc = tokenize(model.tokenizer, [texts[i] for i in batch], max_length, prefix, pad_to_multiple_of)
        emb = model.embed(enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device), kind)
        if emb.dim() != 2:
            raise ValueError(f"the model returned {emb.dim()}-d embeddings; retrieval needs one vector per text "
                             f"(colbert multi-vector pooling is not supported here)")
        idx_parts.append(torch.tensor(batch, dtype=torch.long))
        emb_parts.append(emb.float())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not emb_parts:
        dim = model.embedding_dim
        return torch.empty(0, dtype=torch.long), torch.empty((0, dim), dtype=torch.float32, device=model.device)
    indices, embeddings = torch.cat(idx_parts), torch.cat(emb_parts)
    if not sharded:  # back to the input order
        order = torch.argsort(indices)
        indices, embeddings = indices[order], embeddings[order.to(embeddings.device)]
    return indices, embeddings


def encode_all(model, texts: list[str], **kwargs) -> torch.Tensor:
    """[len(texts), D] embeddings in input order; under torchrun the work is split across ranks
    and the rows gathered, so every rank gets the whole matrix."""
    if not D.is_distributed():
        return encode_texts(model, texts, **kwargs)[1]
    idx, emb = encode_texts(model, texts, sharded=True, **kwargs)
    return D.gather_rows(idx, emb, len(texts))


def _bar(total: int, progress: bool | None, desc: str):
    """tqdm on a terminal (rank 0 only), or when asked."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or not D.is_main():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text")

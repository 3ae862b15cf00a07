"""Cached (GradCache) encoding: a global batch whose encoder activations do not fit in memory.

One training micro-batch, `cached_step`:

1. pass 1, no graph: queries and passages are encoded chunk by chunk (at most `chunk_size`
   sequences per chunk) under `torch.no_grad()`; the RNG state before each chunk is recorded
   (the CPU generator, and the CUDA one on CUDA);
2. the loss (`objective.train_loss`, cross-rank gathering included) runs on the concatenated,
   detached embeddings with `requires_grad`; `(loss * loss_scale).backward()` leaves the loss's
   gradient w.r.t. every embedding (and nothing else: the encoder is not in this graph);
3. pass 2: each chunk is re-encoded with grad under its recorded RNG state, so every dropout mask
   (Hugging Face dropout, SDPA attention dropout, LoRA dropout whose seed is drawn from torch's CPU
   generator) is the one of pass 1 and the chunk's embeddings are pass 1's; then
   `torch.autograd.backward(chunk_embeddings, chunk_grad)` accumulates the parameter gradients.
   The global RNG is left where pass 1 left it (pass 2 runs inside a fork of the RNG).

Peak activation memory is that of one chunk (plus the embeddings of the batch), not of the whole
batch x passages; the price is about one extra forward per step.

Padding-aware chunks: within a step, sequences are sorted by real length (queries and passages
separately, longest first) and each chunk is cut to its own columns with a real token (all-padding
columns dropped: at the right for right padding, at the left for left padding; read from the mask,
so no padding side needs to be known). The embeddings are scattered back to the batch's order
before the loss; ColBERT token embeddings [n, L_chunk, D] go back to their original columns of a
zero tensor [N, L, D] so that the batch's own attention mask describes them (padded positions are
ignored by the MaxSim op). `CachedStepResult` carries the real and the encoded (padded) token
counts for the log. Dropping left-padding columns moves the real tokens' absolute column index:
rotary models (the left-padded decoders) see the same relative positions and give the same
embeddings up to rounding; right-padded encoders with absolute position embeddings keep their
positions. `encode_in_chunks` is the same padding-aware encode without caching (e.g. for
validation under no_grad).

FSDP2: gradients are reduce-scattered once per optimizer step, not once per chunk: every backward
runs with `set_requires_gradient_sync(False)`, except that on the LAST micro-batch of the optimizer
step (`last_micro_batch=True`) each FSDP module reduces in the backward of the last chunk it takes
part in (the last chunk for the root and a shared encoder; with separate encoders the query
encoder's blocks at the last query chunk, the passage encoder's at the last passage chunk). So each
parameter group is reduce-scattered exactly once per optimizer step. Sync is switched back on when
the call returns. Between reductions FSDP2 keeps unsharded gradients (the memory of one full
gradient copy of the trainable parameters per rank, as FSDP's no_sync does).

Every rank runs the same number of chunks (ceil(rows / chunk_size), equal local batches), as
FSDP's per-block all-gathers require.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


@dataclass(frozen=True)
class Chunk:
    """One chunk of a batch's sequences: rows `rows` (indices into the batch), columns
    [start, end) of the batch's padded width, `real_tokens` real (mask 1) tokens."""
    rows: torch.Tensor
    start: int
    end: int
    real_tokens: int

    @property
    def padded_tokens(self) -> int:
        """Tokens the encoder computes on for this chunk (rows x width)."""
        return int(self.rows.numel()) * (self.end - self.start)


class CachedStepResult(NamedTuple):
    """What `cached_step` returns.

    loss: the micro-batch's loss, detached, NOT multiplied by loss_scale.
    real_tokens: mask-1 tokens of queries and passages (what the plain path counts).
    padded_tokens: tokens the encoder computed on (each chunk's rows x its own width), per pass.
    collated_tokens: rows x collated width, what an encode of the whole batch computes on.
    chunks: chunks encoded per pass (queries + passages)."""
    loss: torch.Tensor
    real_tokens: int
    padded_tokens: int
    collated_tokens: int
    chunks: int


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"grad cache: chunk_size must be a positive int (sequences per chunk), got {chunk_size!r}")
    return chunk_size


def plan_chunks(attention_mask: torch.Tensor, chunk_size: int, padding_aware: bool = True) -> list[Chunk]:
    """The chunks of a batch of N sequences ([N, L] mask): ceil(N / chunk_size) of them, a count that
    depends on N only (every rank agrees on it).

    padding_aware: rows sorted by real length, longest first (stable), and each chunk cut to the
    columns where one of its rows has a real token. False: rows in batch order, full width.
    One small device-to-host copy of the mask per call."""
    check_chunk_size(chunk_size)
    if attention_mask.dim() != 2:
        raise ValueError(f"grad cache: attention_mask must be [N, L], got {tuple(attention_mask.shape)}")
    n, width = attention_mask.shape
    mask = attention_mask.detach().to("cpu") != 0
    lengths = mask.sum(1)
    if padding_aware:
        order = torch.sort(lengths, descending=True, stable=True).indices
    else:
        order = torch.arange(n)
    chunks = []
    for lo in range(0, n, chunk_size):
        rows = order[lo:lo + chunk_size]
        start, end = 0, width
        if padding_aware:
            cols = mask[rows].any(0).nonzero().flatten()
            if cols.numel():  # a chunk of empty sequences keeps the full width
                start, end = int(cols[0]), int(cols[-1]) + 1
        chunks.append(Chunk(rows.to(attention_mask.device), start, end, int(lengths[rows].sum())))
    return chunks


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _encode_chunk(model, input_ids, attention_mask, kind: str, chunk: Chunk, autocast) -> torch.Tensor:
    ids = input_ids[chunk.rows, chunk.start:chunk.end]
    mask = attention_mask[chunk.rows, chunk.start:chunk.end]
    with autocast():
        return model.encode(ids, mask, kind)


def _place(full: torch.Tensor | None, emb: torch.Tensor, chunk: Chunk, n: int, width: int) -> torch.Tensor:
    """Write a chunk's embeddings into the batch tensor (allocated on the first chunk): pooled
    [n, D] rows, or ColBERT tokens [n, L_chunk, D] at their original columns of a zero [N, L, D]."""
    if full is None:
        if emb.dim() == 2:
            full = emb.new_empty((n, emb.shape[1]))
        elif emb.dim() == 3:
            full = emb.new_zeros((n, width, emb.shape[2]))
        else:
            raise ValueError(f"grad cache: encode() returned a tensor of shape {tuple(emb.shape)}; "
                             "expected [n, D] or [n, L, D]")
    if emb.dim() == 2:
        full[chunk.rows] = emb
    else:
        full[chunk.rows, chunk.start:chunk.end] = emb
    return full


def _chunk_grad(grad: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    return grad[chunk.rows] if grad.dim() == 2 else grad[chunk.rows, chunk.start:chunk.end]


def encode_in_chunks(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str,
                     chunks: list[Chunk], autocast: Callable = contextlib.nullcontext,
                     rng_states: list | None = None) -> torch.Tensor:
    """`model.encode` of the batch, chunk by chunk, scattered back to the batch's row order
    ([N, D], or [N, L, D] for token embeddings, zeros at the columns a chunk dropped). Keeps the
    autograd graph when grad is enabled (the padding-aware encode without caching). rng_states:
    a list to which the RNG state before each chunk is appended."""
    n, width = attention_mask.shape
    device = input_ids.device
    full = None
    for chunk in chunks:
        if rng_states is not None:
            rng_states.append(_rng_state(device))
        full = _place(full, _encode_chunk(model, input_ids, attention_mask, kind, chunk, autocast), chunk, n, width)
    return full


def fsdp_modules_of(model: torch.nn.Module) -> list:
    """Every FSDP2 module in `model` (empty when not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _set_sync(modules, flag: bool) -> None:
    for m in modules:
        m.set_requires_gradient_sync(flag, recurse=False)


def _last_chunk_of(model, modules, n_query_chunks: int, n_passage_chunks: int) -> list[int]:
    """For each FSDP module, the index (queries first, then passages) of the last chunk whose
    backward it takes part in: the last query chunk for a module inside the query encoder alone
    (separate encoders), the very last chunk for everything else (the root, a shared encoder, the
    passage encoder)."""
    last = n_query_chunks + n_passage_chunks - 1
    if getattr(model, "share_encoder", True) or not hasattr(model, "query_encoder"):
        return [last] * len(modules)
    query_only = {id(m) for m in model.query_encoder.modules()} - {id(m) for m in model.passage_encoder.modules()}
    return [n_query_chunks - 1 if id(m) in query_only else last for m in modules]


def cached_step(model, objective, batch: dict, chunk_size: int, info, *,
                autocast: Callable = contextlib.nullcontext, loss_scale: float = 1.0, fsdp_modules=None,
                last_micro_batch: bool = True, padding_aware: bool = True) -> CachedStepResult:
    """One micro-batch with cached encoding (see the module docstring): forward and backward,
    the parameter gradients accumulated into `.grad` as `(loss * loss_scale).backward()` of the
    plain path would.

    model: a Biencoder (`encode(input_ids, attention_mask, kind)`, `share_encoder`), in training mode.
    objective: `train_loss(q, q_mask, p, p_mask, passage_ids, info, teacher_scores=None) -> loss`.
    batch: q_input_ids, q_attention_mask [B, Lq], p_input_ids, p_attention_mask [B*n, Lp],
        optionally passage_ids [B*n].
    chunk_size: at most this many sequences per chunk (queries and passages chunked separately).
    autocast: a callable returning the context the encoder runs in (the trainer's `self.autocast`);
        the loss runs outside it, as in the plain path.
    loss_scale: the backward is of loss * loss_scale (1 / gradient-accumulation steps).
    fsdp_modules: the FSDP2 modules whose gradient sync to control, each set with recurse=False (so
        list them all); None: every FSDPModule in model.
    last_micro_batch: whether this is the last micro-batch of the optimizer step; False: no chunk
        reduces gradients (they accumulate unsharded until the last micro-batch's sync).
    padding_aware: length-sorted chunks cut to their own longest (see plan_chunks).
    Returns a CachedStepResult (loss detached and unscaled, token counts)."""
    check_chunk_size(chunk_size)
    q_ids, q_mask = batch["q_input_ids"], batch["q_attention_mask"]
    p_ids, p_mask = batch["p_input_ids"], batch["p_attention_mask"]
    device = q_ids.device
    q_chunks = plan_chunks(q_mask, chunk_size, padding_aware)
    p_chunks = plan_chunks(p_mask, chunk_size, padding_aware)
    modules = fsdp_modules_of(model) if fsdp_modules is None else list(fsdp_modules)

    # pass 1: every embedding, no graph, the RNG state of every chunk recorded
    q_states, p_states = [], []
    with torch.no_grad():
        q = encode_in_chunks(model, q_ids, q_mask, "query", q_chunks, autocast, q_states)
        p = encode_in_chunks(model, p_ids, p_mask, "passage", p_chunks, autocast, p_states)
    q, p = q.detach().requires_grad_(True), p.detach().requires_grad_(True)

    # the loss on the cached embeddings: its gradient w.r.t. each of them
    loss = objective.train_loss(q, q_mask, p, p_mask, batch.get("passage_ids"), info,
                                teacher_scores=batch.get("teacher_scores"))
    (loss * loss_scale).backward()
    q_grad = q.grad if q.grad is not None else torch.zeros_like(q)
    p_grad = p.grad if p.grad is not None else torch.zeros_like(p)
    del q, p

    # pass 2: each chunk again, with grad, under its pass-1 RNG state; backward of its share
    plan = [("query", q_ids, q_mask, c, s, q_grad) for c, s in zip(q_chunks, q_states)]
    plan += [("passage", p_ids, p_mask, c, s, p_grad) for c, s in zip(p_chunks, p_states)]
    # each FSDP module reduces its (accumulated) gradients in the backward of the last chunk it
    # takes part in, on the last micro-batch of the optimizer step; never before
    sync_at = _last_chunk_of(model, modules, len(q_chunks), len(p_chunks)) if last_micro_batch \
        else [-1] * len(modules)
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for k, (kind, ids, mask, chunk, state, grad) in enumerate(plan):
                _set_rng_state(state, device)
                for module, at in zip(modules, sync_at):
                    module.set_requires_gradient_sync(at == k, recurse=False)
                emb = _encode_chunk(model, ids, mask, kind, chunk, autocast)
                torch.autograd.backward(emb, _chunk_grad(grad, chunk))
                del emb
    finally:
        _set_sync(modules, True)

    real = sum(c.real_tokens for c in q_chunks + p_chunks)
    padded = sum(c.padded_tokens for c in q_chunks + p_chunks)
    collated = q_mask.numel() + p_mask.numel()
    return CachedStepResult(loss.detach(), real, padded, collated, len(q_chunks) + len(p_chunks))

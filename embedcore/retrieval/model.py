"""A model ready for retrieval: backbone(s), tokenizer, pooling, normalisation, prefixes.

Built on embedcore.models.backbone.load_backbone, so it reads our exported folders (with a
separate `passage_encoder/` when query and passage encoders are not shared) and
sentence-transformers folders (pooling, Normalize, prompts, max_seq_length come from them).
A bare Hugging Face folder carries no pooling: the recipe's defaults (avg, L2-normalised) are
used and said in the log, unless the caller passes them.
"""
from __future__ import annotations

import logging

import torch

from embedcore.ops.pool_l2 import MODES, pool_l2

log = logging.getLogger("embedcore.retrieval")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNSET = object()


class RetrievalModel:
    """embed(input_ids, attention_mask, kind) -> [B, D] with the model's own pooling and normalisation.

    Attributes: tokenizer, device, pooling, l2_normalize, query_prefix, passage_prefix,
    max_seq_length (None when the folder does not say), embedding_dim, path.
    """

    def __init__(self, query_encoder, passage_encoder, tokenizer, *, pooling, l2_normalize, query_prefix,
                 passage_prefix, max_seq_length, device, path=""):
        if pooling not in MODES:
            raise ValueError(f"{path}: unknown pooling {pooling!r}; expected one of {MODES}")
        if pooling == "colbert":
            raise ValueError(f"{path}: colbert (multi-vector) pooling cannot be used for single-vector retrieval")
        self.query_encoder, self.passage_encoder = query_encoder, passage_encoder
        self.tokenizer = tokenizer
        self.pooling, self.l2_normalize = pooling, bool(l2_normalize)
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.max_seq_length = max_seq_length
        self.device = torch.device(device)
        self.path = path
        self.embedding_dim = int(query_encoder.config.hidden_size)

    def prefix(self, kind: str) -> str | None:
        return self.query_prefix if kind == "query" else self.passage_prefix

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
        encoder = self.query_encoder if kind == "query" else self.passage_encoder
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_l2(hidden, attention_mask, self.pooling, self.l2_normalize)

    @classmethod
    def load(cls, path, *, device=None, dtype="float32", pooling=None, l2_normalize=None,
             query_prefix=_UNSET, passage_prefix=_UNSET, key: str = "model") -> "RetrievalModel":
        """Load a model folder; explicit pooling / l2_normalize / prefixes override the folder's.

        query_prefix / passage_prefix: None means the folder's prompt (no prefix when it has none),
        "" means no prefix. Errors name `key` (the config key or flag the path came from)."""
        from embedcore.models.backbone import load_backbone, load_tokenizer

        from embedcore.retrieval import distributed as D

        device = torch.device(device) if device is not None else D.default_device()
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"{key}: unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
        try:
            query_encoder, info = load_backbone(path, torch_dtype=dtype)
            tokenizer = load_tokenizer(path, padding_side=info["padding_side"])
            passage_encoder = query_encoder
            if info.get("passage_encoder_path"):
                passage_encoder, _ = load_backbone(info["passage_encoder_path"], torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"{key}: cannot load the model {str(path)!r}: {e}") from e
        if pooling is None:
            pooling = info.get("pooling")
        if l2_normalize is None:
            l2_normalize = info.get("l2_normalize")
        if pooling is None or l2_normalize is None:
            log.warning("%s: %s does not say its pooling/normalisation; using the recipe defaults (avg, L2-normalised)",
                        key, path)
            pooling = pooling or "avg"
            l2_normalize = True if l2_normalize is None else l2_normalize
        if query_prefix is _UNSET or query_prefix is None:
            query_prefix = info.get("query_prefix")
        if passage_prefix is _UNSET or passage_prefix is None:
            passage_prefix = info.get("passage_prefix")
        for enc in {id(query_encoder): query_encoder, id(passage_encoder): passage_encoder}.values():
            enc.to(device).eval()
        return cls(query_encoder, passage_encoder, tokenizer, pooling=pooling, l2_normalize=l2_normalize,
                   query_prefix=query_prefix or None, passage_prefix=passage_prefix or None,
                   max_seq_length=info.get("max_seq_length"), device=device, path=str(path))

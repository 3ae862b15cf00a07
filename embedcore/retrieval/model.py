"""A model ready for retrieval: a Biencoder, its tokenizer and its prefixes.

Built on embedcore.models.biencoder.Biencoder.from_pretrained, so it reads our exported folders
(with a separate `passage_encoder/` when query and passage encoders are not shared) and
sentence-transformers folders (pooling, Normalize, prompts, max_seq_length come from them).
A bare Hugging Face folder carries no pooling: the recipe's defaults (avg, L2-normalised) are
used and said in the log, unless the caller passes them.

Prefixes per dataset (mining and evaluation, one corpus at a time: ``prefixes_for``), per side:
1. a prefix the caller gave explicitly (``--query-prefix``, ``mining.query_prefix``) is the base;
2. else, when the folder has a prompt for that corpus (``"<corpus_id>:query"`` /
   ``"<corpus_id>:document"``, written by our export when the corpus was trained with its own
   instructions), that prompt is used as it is: it is what training fed for that corpus;
3. else the folder's own prefix (its ``query`` / ``document`` prompt) is the base.
With ``use_instructions`` the base is then combined with the corpus's instruction by the
training rule (embedcore.data.instructions.resolve_prefix).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from embedcore.dtypes import parse_dtype
from embedcore.errors import ConfigError, ModelError
from embedcore.ops.pool_l2 import MODES

log = logging.getLogger("embedcore.retrieval")

class RetrievalModel:
    """embed(input_ids, attention_mask, kind) -> [B, D] with the model's own pooling and normalisation.

    Attributes: biencoder, tokenizer, device, pooling, l2_normalize, query_prefix, passage_prefix,
    max_seq_length (None when the folder does not say), embedding_dim, path.
    """

    def __init__(self, biencoder, tokenizer, *, query_prefix, passage_prefix, max_seq_length, device, path=""):
        if biencoder.pooling == "colbert":
            raise ValueError(f"{path}: colbert (multi-vector) pooling cannot be used for single-vector retrieval")
        self.biencoder = biencoder
        self.tokenizer = tokenizer
        self.pooling, self.l2_normalize = biencoder.pooling, biencoder.l2_normalize
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.prompts: dict = {}  # named prompts of the folder ({name: prefix}), see prefixes_for
        self.explicit_prefixes = (False, False)  # (query, passage) given by the caller, not the folder's
        self.max_seq_length = max_seq_length
        self.device = torch.device(device)
        self.path = path
        self.embedding_dim = int(biencoder.query_encoder.config.hidden_size)
        self.dim = None  # a prefix length to embed with (set_dim), None: the whole embedding

    def set_dim(self, dim: int | None, key: str = "dim") -> None:
        """Embed with the first `dim` dimensions only, re-normalised when the model normalises (a
        Matryoshka prefix, as trained: see embedcore.ops.matryoshka). None: the whole embedding."""
        if dim is not None and not 1 <= dim <= self.embedding_dim:
            raise ConfigError(f"{key}: {dim} is not in [1, {self.embedding_dim}] (the model's embedding dimension)")
        self.dim = dim

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
        emb = self.biencoder.encode(input_ids, attention_mask, kind)
        if self.dim is None:
            return emb
        emb = emb[..., :self.dim]
        return torch.nn.functional.normalize(emb, dim=-1) if self.l2_normalize else emb

    def prefixes_for(self, dataset: str | None, instructions=(None, None), use_instructions: bool = False):
        """(query prefix, passage prefix) for one corpus by the rule of the module docstring.

        dataset: the corpus id (None: a source without one, e.g. a BEIR folder or inline data);
        instructions: that corpus's (query_instruction, passage_instruction).
        """
        from embedcore.data.instructions import prompt_names, resolve_prefix

        names = prompt_names(dataset) if dataset is not None else (None, None)
        out = []
        for side, base, explicit, name, instruction in (
                ("query_prefix", self.query_prefix, self.explicit_prefixes[0], names[0], instructions[0]),
                ("passage_prefix", self.passage_prefix, self.explicit_prefixes[1], names[1], instructions[1])):
            if not explicit and name in self.prompts:
                out.append(self.prompts[name])
            elif use_instructions:
                where = f"{self.path}: {side} for {'corpus ' + repr(dataset) if dataset is not None else 'the data'}"
                out.append(resolve_prefix(base, instruction, where))
            else:
                out.append(base)
        return tuple(p or None for p in out)

    @contextlib.contextmanager
    def using_prefixes(self, query_prefix: str | None, passage_prefix: str | None):
        """Within the block, query_prefix / passage_prefix are these (one corpus's, see prefixes_for)."""
        saved = self.query_prefix, self.passage_prefix
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        try:
            yield self
        finally:
            self.query_prefix, self.passage_prefix = saved

    @classmethod
    def load(cls, path, *, device=None, dtype="float32", pooling=None, l2_normalize=None,
             query_prefix=None, passage_prefix=None, key: str = "model") -> "RetrievalModel":
        """Load a model folder; explicit pooling / l2_normalize / prefixes override the folder's.

        query_prefix / passage_prefix: None means the folder's prompt (no prefix when it has none),
        "" means no prefix. Errors name `key` (the config key or flag the path came from)."""
        from embedcore.models.backbone import load_tokenizer
        from embedcore.models.biencoder import Biencoder
        from embedcore.distributed import default_device

        device = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype, key)
        if pooling is not None and pooling not in MODES:
            raise ConfigError(f"{key}: unknown pooling {pooling!r}; expected one of {MODES}")
        separate = os.path.isfile(os.path.join(os.fspath(path), "passage_encoder", "config.json"))
        try:
            biencoder = Biencoder.from_pretrained(path, share_encoder=not separate, pooling=pooling,
                                                  l2_normalize=l2_normalize, torch_dtype=dtype)
            tokenizer = load_tokenizer(path, padding_side=biencoder.padding_side)
        except (OSError, ValueError) as e:  # missing folders, unreadable configs, refused weights (ModelError)
            raise ModelError(f"{key}: cannot load the model {str(path)!r}: {e}") from e
        found = biencoder.backbone_info
        if found.get("pooling") is None and pooling is None:
            log.warning("%s: %s does not say its pooling; using %s, L2-normalised: %s", key, path,
                        biencoder.pooling, biencoder.l2_normalize)
        explicit = (query_prefix is not None, passage_prefix is not None)
        if query_prefix is None:
            query_prefix = found.get("query_prefix")
        if passage_prefix is None:
            passage_prefix = found.get("passage_prefix")
        biencoder.to(device).eval()
        model = cls(biencoder, tokenizer, query_prefix=query_prefix or None, passage_prefix=passage_prefix or None,
                    max_seq_length=found.get("max_seq_length"), device=device, path=str(path))
        from embedcore.models.st_export import read_prompts

        model.prompts, model.explicit_prefixes = read_prompts(os.fspath(path)), explicit
        return model

"""Biencoder: a query encoder and a passage encoder (one shared module, or two) + pool_l2.

`share_encoder=True` registers ONE module (state_dict keys `query_encoder.*`; `passage_encoder` is an
alias). `share_encoder=False` registers a second module `passage_encoder` (a deep copy of the query
encoder at start, or the `passage_encoder/` subfolder of one of our exports), trained and exported.

Export (`save_pretrained`), a folder sentence-transformers loads as it is:
    out_dir/                    the QUERY encoder: config.json, model.safetensors, tokenizer files,
                                sentence-transformers files (st_export.py), embedcore_biencoder.json
    out_dir/passage_encoder/    only when share_encoder=False: the passage encoder, itself a complete
                                sentence-transformers folder (load it for documents)
colbert pooling has no sentence-transformers form: the folder then holds the Hugging Face model,
the tokenizer and embedcore_biencoder.json (pooling "colbert") only, and a warning says so.
"""
from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from embedcore.models.backbone import load_backbone, prepare_tokenizer
from embedcore.models.st_export import ColbertNotExportable, write_embedcore_settings, write_sentence_transformers_files
from embedcore.ops.pool_l2 import MODES, pool_l2

log = logging.getLogger("embedcore")


class Biencoder(nn.Module):
    """Query/passage encoders over a Hugging Face backbone, pooled and normalised by pool_l2."""

    def __init__(self, query_encoder: nn.Module, passage_encoder: nn.Module | None = None, pooling: str = "avg",
                 l2_normalize: bool = True, pooling_backend: str | None = None, backbone_info: dict | None = None):
        super().__init__()
        if pooling not in MODES:
            raise ValueError(f"Biencoder: unknown pooling {pooling!r}; expected one of {MODES}")
        self.query_encoder = query_encoder
        if passage_encoder is not None and passage_encoder is not query_encoder:
            # straight into _modules: add_module refuses a name the class has a property for
            self._modules["passage_encoder"] = passage_encoder
        self.pooling, self.l2_normalize, self.pooling_backend = pooling, bool(l2_normalize), pooling_backend
        # what load_backbone read from the folder (embedding settings, decoder or not, padding side)
        self.backbone_info = dict(backbone_info or {})
        self.is_decoder = bool(self.backbone_info.get("is_decoder", False))
        self.padding_side = self.backbone_info.get("padding_side") or "right"

    @property
    def passage_encoder(self) -> nn.Module:  # a registered module when not shared, else the query encoder
        separate = self._modules.get("passage_encoder")
        return self._modules["query_encoder"] if separate is None else separate

    @property
    def share_encoder(self) -> bool:
        return "passage_encoder" not in self._modules

    @classmethod
    def from_pretrained(cls, path, share_encoder: bool = True, pooling: str | None = None,
                        l2_normalize: bool | None = None, torch_dtype: torch.dtype = torch.float32,
                        pooling_backend: str | None = None, attn_implementation: str | None = None) -> "Biencoder":
        """Load from a local model / sentence-transformers / embedcore-export folder.

        pooling / l2_normalize None: the folder's settings (ST or our export), else "avg" / True.
        share_encoder=False: the folder's `passage_encoder/` if it has one, else a deep copy.
        """
        query, found = load_backbone(path, torch_dtype=torch_dtype, attn_implementation=attn_implementation)
        passage = None
        if not share_encoder:
            if found["passage_encoder_path"]:
                passage, _ = load_backbone(found["passage_encoder_path"], torch_dtype=torch_dtype,
                                           attn_implementation=attn_implementation)
            else:
                passage = copy.deepcopy(query)
        elif found["passage_encoder_path"]:
            log.warning("%s has a separate passage encoder (%s); share_encoder=true uses the query encoder "
                        "for both", path, found["passage_encoder_path"])
        pooling = pooling if pooling is not None else (found["pooling"] or "avg")
        l2 = l2_normalize if l2_normalize is not None else (True if found["l2_normalize"] is None else found["l2_normalize"])
        return cls(query, passage, pooling=pooling, l2_normalize=l2, pooling_backend=pooling_backend,
                   backbone_info=found)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str = "query") -> torch.Tensor:
        """Embeddings [B, D] ([B, S, D] for colbert) of a tokenised batch, by the `kind` encoder."""
        if kind == "query":
            encoder = self.query_encoder
        elif kind == "passage":
            encoder = self.passage_encoder
        else:
            raise ValueError(f"Biencoder.encode: kind must be 'query' or 'passage', got {kind!r}")
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_l2(hidden, attention_mask, self.pooling, self.l2_normalize, backend=self.pooling_backend)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(query embeddings, passage embeddings) of a collated batch (q_/p_ input_ids, attention_mask)."""
        missing = [k for k in ("q_input_ids", "q_attention_mask", "p_input_ids", "p_attention_mask") if k not in batch]
        if missing:
            raise KeyError(f"Biencoder.forward: batch lacks {missing}")
        q = self.encode(batch["q_input_ids"], batch["q_attention_mask"], "query")
        p = self.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
        return q, p

    @property
    def embedding_dim(self) -> int:
        """D of the embeddings (the encoder's hidden size: pooling keeps it)."""
        return _hidden_size(self.query_encoder)

    def encoders(self) -> list[nn.Module]:
        """The distinct encoder modules (one when shared)."""
        return [self.query_encoder] if self.share_encoder else [self.query_encoder, self.passage_encoder]

    def transformer_blocks(self) -> list[nn.Module]:
        """Every transformer layer of every distinct encoder (the units FSDP2 shards one by one)."""
        return [block for enc in self.encoders() for block in _layer_list(enc)]

    def fsdp_units(self) -> list[nn.Module]:
        """What to `fully_shard`, in order, before the root: every block, then each encoder.

        Sharding each encoder (not only the root) matters: `encode()` calls an encoder directly, which
        bypasses the root's FSDP pre-forward hook, so the embeddings / final norm would stay sharded
        (DTensor vs Tensor error) unless the encoder is an FSDP unit of its own.
        """
        return self.transformer_blocks() + self.encoders()

    def save_pretrained(self, out_dir, tokenizer, query_prefix: str | None = None, passage_prefix: str | None = None,
                        max_seq_length: int | None = None, state_dict: dict | None = None) -> str:
        """Consolidated export (see the module docstring); returns out_dir.

        state_dict: a FULL state dict of this Biencoder (keys query_encoder.* / passage_encoder.*), needed
        when the parameters are sharded (FSDP2: gather with get_model_state_dict(full_state_dict=True,
        cpu_offload=True) and call this on rank 0 only); None uses the module's own tensors.
        """
        out_dir = os.fspath(out_dir)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            # stale files of another export (modules.json, 2_Normalize, passage_encoder/) would be loaded too
            raise FileExistsError(f"Biencoder.save_pretrained: {out_dir!r} exists and is not empty; export into a new folder")
        if state_dict is None:
            state_dict = self.state_dict()
        parts = [("query_encoder", self.query_encoder, out_dir)]
        if not self.share_encoder:
            parts.append(("passage_encoder", self.passage_encoder, os.path.join(out_dir, "passage_encoder")))
        known = tuple(f"{name}." for name, _, _ in parts)
        stray = [k for k in state_dict if not k.startswith(known)]
        if stray:
            raise ValueError(f"Biencoder.save_pretrained: state_dict keys outside {known}: {stray[:5]}")
        tok = prepare_tokenizer(copy.deepcopy(tokenizer), self.padding_side)
        for key in ("local_files_only", "is_local"):  # how WE loaded it, not a property of the tokenizer
            tok.init_kwargs.pop(key, None)
        for name, encoder, folder in parts:
            sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            _save_encoder(encoder, sub, folder)
            tok.save_pretrained(folder)
            settings = dict(pooling=self.pooling, l2_normalize=self.l2_normalize, query_prefix=query_prefix,
                            passage_prefix=passage_prefix, max_seq_length=max_seq_length)
            write_embedcore_settings(folder, **settings, padding_side=self.padding_side, is_decoder=self.is_decoder,
                                     share_encoder=self.share_encoder, role=name)
            try:
                write_sentence_transformers_files(folder, _hidden_size(encoder), **settings)
            except ColbertNotExportable as e:
                log.warning("%s: %s; wrote the Hugging Face model, tokenizer and embedcore_biencoder.json only "
                            "(no sentence-transformers files)", folder, e)
        return out_dir


def _hidden_size(encoder: nn.Module) -> int:
    cfg = encoder.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def _save_encoder(encoder: nn.Module, state_dict: dict, folder: str) -> None:
    """Save one encoder as a HF folder, refusing weights its architecture would not load (e.g. unmerged LoRA)."""
    from transformers import AutoModel

    with torch.device("meta"):
        expected = set(AutoModel.from_config(encoder.config).state_dict())
    got = set(state_dict)
    extra, missing = sorted(got - expected), sorted(expected - got)
    if extra or missing:
        raise ValueError(
            f"cannot export to {folder!r}: the weights do not match a plain {type(encoder).__name__} "
            f"(unexpected {extra[:4]}, missing {missing[:4]}); merge LoRA adapters into the base weights "
            f"before a consolidated export"
        )
    os.makedirs(folder, exist_ok=True)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    encoder.save_pretrained(folder, state_dict=state_dict)


def _layer_list(encoder: nn.Module) -> list[nn.Module]:
    """The transformer layers: the ModuleList with config.num_hidden_layers entries of one class."""
    n = getattr(encoder.config, "num_hidden_layers", None)
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.ModuleList) and n and len(mod) == n and len({type(m) for m in mod}) == 1:
            return list(mod)
    raise ValueError(f"cannot find the {n} transformer layers of {type(encoder).__name__}")

"""Load an embedding backbone from a local folder (never downloads).

`load_backbone(path)` accepts
- a Hugging Face model folder of an encoder (BERT, RoBERTa, XLM-R, ModernBERT, ...): loaded as is;
- a Hugging Face folder of a Llama / Qwen2 / Qwen3 / Mistral decoder (a `*Model` or a `*ForCausalLM`
  checkpoint: `AutoModel` keeps the base model): made bidirectional (see bidirectional.py) and checked;
- a sentence-transformers folder (`modules.json`): the Transformer module's folder is loaded as above,
  and its pooling, normalisation, prompts and max_seq_length are returned in `backbone_info`.
Other decoder-only families are refused rather than silently trained causally.

Padding side: decoders pad on the LEFT with EOS as pad when the tokenizer has none (the reference's
choice; RoPE is relative, so left padding leaves the real tokens' states unchanged), encoders keep
their tokenizer's side (right for BERT-likes, whose absolute positions need it). `prepare_tokenizer`
applies this; the export records it in tokenizer_config.json so sentence-transformers pads the same way.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from embedcore.dtypes import parse_dtype
from embedcore.errors import ModelError, PathNotFound
from embedcore.models.bidirectional import BIDIRECTIONAL_FAMILIES, check_bidirectional, make_bidirectional

DECODER_PADDING_SIDE = "left"


def _require_folder(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise PathNotFound(
            f"model folder {path!r} does not exist or is not a directory (models are loaded from local "
            f"folders only, never downloaded)"
        )
    return path


def resolve_model_folder(path, require_config: bool = True) -> tuple[str, dict[str, Any] | None]:
    """(folder holding config.json, saved embedding settings or None) for a model or ST folder.

    The settings come from embedcore_biencoder.json (our own export, exact) or else from the
    sentence-transformers files (modules.json & co); see st_export.read_sentence_transformers_folder.
    """
    from embedcore.models.st_export import read_embedcore_settings, read_sentence_transformers_folder

    path = _require_folder(path)
    settings = None
    folder = path
    if os.path.isfile(os.path.join(path, "modules.json")):
        settings = read_sentence_transformers_folder(path)
        folder = settings["transformer_path"]
    ours = read_embedcore_settings(path)
    if ours is not None:
        settings = {**(settings or {"transformer_path": path}), **ours}
    if require_config and not os.path.isfile(os.path.join(folder, "config.json")):
        raise PathNotFound(f"model folder {folder!r} has no config.json (is it a Hugging Face model folder?)")
    return folder, settings


def load_config(folder: str):
    """AutoConfig from a local folder, with an error naming the folder."""
    from transformers import AutoConfig

    if _needs_remote_code(folder):
        raise ModelError(f"model folder {folder!r}: its config.json names custom code (auto_map); a model that "
                         f"needs remote code (trust_remote_code) is never run here")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the path, the original chained
        raise ModelError(f"cannot read the model config in {folder!r}: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _needs_remote_code(folder: str) -> bool:
    """A config.json with an auto_map names Python files of the folder that transformers would import."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False  # AutoConfig reports the unreadable file
    return isinstance(cfg, dict) and bool(cfg.get("auto_map"))


def is_decoder_family(config) -> bool:
    """True for the decoder families we make bidirectional; raises for any other decoder-only model."""
    model_type = getattr(config, "model_type", None)
    if model_type in BIDIRECTIONAL_FAMILIES:
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ModelError(
            f"decoder-only model_type {model_type!r} is not supported as an embedding backbone: only "
            f"{BIDIRECTIONAL_FAMILIES} are made bidirectional; encoders (BERT, RoBERTa, XLM-R, ModernBERT...) "
            f"are used as they are"
        )
    return False


def load_backbone(path, torch_dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Load the backbone in `path` (model folder or sentence-transformers folder).

    Returns (model, backbone_info), the latter what the folder says about the backbone; its keys:
    model_path (folder of config.json), model_type, is_decoder, padding_side,
    pooling / l2_normalize / query_prefix / passage_prefix / max_seq_length (from our export's
    embedcore_biencoder.json or a sentence-transformers folder, else None), passage_encoder_path (a
    separately exported passage encoder, else None), sentence_transformers (bool).
    torch_dtype: a torch dtype or its name ("bfloat16"); attn_implementation: None (transformers'
    default, sdpa) or "eager" / "sdpa" / "flash_attention_2".
    """
    from transformers import AutoModel

    torch_dtype = parse_dtype(torch_dtype, "torch_dtype")  # also the YAML spelling ("bfloat16", "torch.float32")
    folder, st = resolve_model_folder(path)
    config = load_config(folder)
    is_decoder = is_decoder_family(config)
    # Safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded.
    kwargs = {"dtype": torch_dtype, "local_files_only": True, "use_safetensors": True, "trust_remote_code": False}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModel.from_pretrained(folder, config=config, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ModelError(f"cannot load the model weights in {folder!r} (safetensors only, no pickles): "
                         f"{_first_line(e)}") from e
    model.config.use_cache = False  # an embedding forward never needs a KV cache
    if is_decoder:
        make_bidirectional(model)
        check_bidirectional(model)
    passage_dir = os.path.join(os.fspath(path), "passage_encoder")
    backbone_info = {
        "model_path": folder,
        "model_type": config.model_type,
        "is_decoder": is_decoder,
        "padding_side": DECODER_PADDING_SIDE if is_decoder else None,
        "pooling": None,
        "l2_normalize": None,
        "query_prefix": None,
        "passage_prefix": None,
        "max_seq_length": None,
        "passage_encoder_path": passage_dir if os.path.isfile(os.path.join(passage_dir, "config.json")) else None,
        "sentence_transformers": os.path.isfile(os.path.join(os.fspath(path), "modules.json")),
    }
    if st is not None:
        for key in ("pooling", "l2_normalize", "query_prefix", "passage_prefix", "max_seq_length"):
            backbone_info[key] = st.get(key)
    if backbone_info["padding_side"] is None:  # encoders: whatever their tokenizer says (right for BERT-likes)
        backbone_info["padding_side"] = _saved_padding_side(folder) or "right"
    return model, backbone_info


def _saved_padding_side(folder: str) -> str | None:
    cfg = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            return json.load(f).get("padding_side")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {cfg!r}: {e}") from e


def prepare_tokenizer(tokenizer, padding_side: str):
    """Give `tokenizer` a pad token (EOS when it has none) and the padding side; returns it.

    Raises when there is neither a pad nor an EOS token (nothing sensible to pad with).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS token; "
                f"add a pad token to it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(path, padding_side: str | None = None):
    """AutoTokenizer from a local model, tokenizer or sentence-transformers folder, prepared by `prepare_tokenizer`.

    padding_side None: left for the decoder families (when the folder has a config.json to tell),
    else the tokenizer's saved side (right by default).
    """
    from transformers import AutoTokenizer

    folder, _ = resolve_model_folder(path, require_config=False)
    if padding_side is None:
        decoder = os.path.isfile(os.path.join(folder, "config.json")) and is_decoder_family(load_config(folder))
        padding_side = DECODER_PADDING_SIDE if decoder else (_saved_padding_side(folder) or "right")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ModelError(f"cannot load the tokenizer in {folder!r}: {_first_line(e)}") from e
    return prepare_tokenizer(tokenizer, padding_side)

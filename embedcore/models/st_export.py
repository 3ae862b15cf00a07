"""sentence-transformers folders: read their settings, write the files that make our export one.

Writing (`write_sentence_transformers_files`), the layout every sentence-transformers version reads:
    modules.json                      Transformer (path ""), Pooling (1_Pooling), Normalize (2_Normalize)
    1_Pooling/config.json             LONG form: word_embedding_dimension + every pooling_mode_* boolean
                                      + include_prompt (the short form of ST >= 5.4 is unreadable before)
    2_Normalize/                      only when l2-normalised
    config_sentence_transformers.json prompts {"query": "<query_prefix> ", "document": "<passage_prefix> "}
                                      (our collator feeds prefix + " " + text, ST feeds prompt + text, so
                                      the prompt carries the space), similarity_fn_name cosine | dot;
                                      with per-dataset instructions also "<corpus_id>:query" /
                                      "<corpus_id>:document" (add_prompts, embedcore.data.instructions)
    sentence_bert_config.json         max_seq_length, do_lower_case false
The model's config.json / weights / tokenizer are written by the caller (Biencoder.save_pretrained).

Pooling map (ours -> ST):  avg -> mean_tokens, cls -> cls_token, last -> lasttoken,
weighted_avg -> weightedmean_tokens. Checked against sentence-transformers 6.2's Pooling:
- cls / lasttoken take the first / last position whose mask is 1: same as ours, either padding side;
- weightedmean weighs position s by (s + 1 - index of the first real token), i.e. 1..n over the real
  tokens for right AND left padding: same as ours. (ST versions without that offset weigh by absolute
  position and agree with us only for right padding.)
- colbert has no ST Pooling equivalent: `ColbertNotExportable` is raised; Biencoder.save_pretrained
  then writes the Hugging Face folder and embedcore_biencoder.json only (documented there).

Decoders made bidirectional need no extra file: config.json carries `is_causal: false`, which
transformers >= 5.2 honours (mask and SDPA flag, see bidirectional.py) and sentence-transformers >= 5
passes through untouched (it even warns when the installed transformers is too old to honour it).
The tokenizer_config.json carries the pad token and padding side used in training.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from embedcore.files import write_json

log = logging.getLogger("embedcore")

OURS_TO_ST = {"avg": "mean_tokens", "cls": "cls_token", "last": "lasttoken", "weighted_avg": "weightedmean_tokens"}
ST_LONG_KEYS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
# short form (ST >= 5.4) names -> long-form names
ST_SHORT_TO_LONG = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens",
                    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "weightedmean": "weightedmean_tokens",
                    "lasttoken": "lasttoken"}
ST_TO_OURS = {v: k for k, v in OURS_TO_ST.items()}


class ColbertNotExportable(ValueError):
    """colbert pooling keeps every token vector: a sentence-transformers Pooling module cannot express it."""


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: cannot read {path!r}: {e}") from e


def prompt_to_prefix(prompt: str | None, where: str) -> str | None:
    """ST prompt -> our prefix: our collator adds one space after the prefix, so drop one here."""
    if prompt is None or prompt == "":
        return prompt
    if prompt.endswith(" "):
        return prompt[:-1]
    log.warning("%s: prompt %r has no trailing space; training text will be %r + ' ' + text, "
                "one space more than sentence-transformers feeds", where, prompt, prompt)
    return prompt


def prefix_to_prompt(prefix: str | None) -> str | None:
    """Our prefix -> ST prompt (the inverse of prompt_to_prefix); empty or None -> no prompt."""
    return f"{prefix} " if prefix else None


def add_prompts(out_dir: str, prompts: dict | None) -> None:
    """Add named prompts ({name: our prefix}) to an export written by write_sentence_transformers_files
    (config_sentence_transformers.json, as ST prompts: prefix + " ", "" for no prefix) and to
    embedcore_biencoder.json ("prompts"); passage_encoder/ too when it exists. No-op for none."""
    if not prompts:
        return
    for folder in (out_dir, os.path.join(out_dir, "passage_encoder")):
        st_file = os.path.join(folder, "config_sentence_transformers.json")
        if os.path.isfile(st_file):
            cfg = _read_json(st_file, "sentence-transformers config")
            cfg["prompts"] = {**(cfg.get("prompts") or {}),
                              **{name: prefix_to_prompt(prefix) or "" for name, prefix in prompts.items()}}
            write_json(st_file, cfg, indent=2)
        ours = os.path.join(folder, EMBEDCORE_SETTINGS)
        if os.path.isfile(ours):
            cfg = _read_json(ours, "embedcore biencoder settings")
            cfg["prompts"] = {**(cfg.get("prompts") or {}), **prompts}
            write_json(ours, cfg, indent=2)


def add_matryoshka_dims(out_dir: str, dims) -> None:
    """Record the prefix lengths a Matryoshka loss trained (embedcore_biencoder.json
    "matryoshka_dims", largest first; passage_encoder/ too when it exists): the dimensions at which
    sentence-transformers' `truncate_dim=` or `embedcore.evaluate --dim` give trained embeddings."""
    for folder in (out_dir, os.path.join(out_dir, "passage_encoder")):
        ours = os.path.join(folder, EMBEDCORE_SETTINGS)
        if os.path.isfile(ours):
            cfg = _read_json(ours, "embedcore biencoder settings")
            cfg["matryoshka_dims"] = sorted((int(d) for d in dims), reverse=True)
            write_json(ours, cfg, indent=2)


def read_prompts(path: str) -> dict:
    """Every named prompt of a model folder as our prefixes ({name: prefix}): embedcore_biencoder.json's
    "prompts" when our export wrote them, else config_sentence_transformers.json's (one trailing
    space dropped, see prompt_to_prefix); {} when the folder has neither."""
    ours = os.path.join(path, EMBEDCORE_SETTINGS)
    if os.path.isfile(ours):
        prompts = _read_json(ours, "embedcore biencoder settings").get("prompts")
        if prompts:
            return dict(prompts)
    st_file = os.path.join(path, "config_sentence_transformers.json")
    if not os.path.isfile(st_file):
        return {}
    prompts = _read_json(st_file, "sentence-transformers config").get("prompts") or {}
    # the same conversion as prompt_to_prefix, without its warning for each unrelated prompt
    return {name: (p[:-1] if p.endswith(" ") else p) for name, p in prompts.items() if isinstance(p, str)}


def _pooling_from_config(cfg: dict, path: str) -> str:
    if "pooling_mode" in cfg:  # short form
        modes = cfg["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
        unknown = [m for m in modes if m not in ST_SHORT_TO_LONG]
        if unknown:
            raise ValueError(f"{path}: unknown pooling_mode {unknown}")
        active = [ST_SHORT_TO_LONG[m] for m in modes]
    else:  # long form; ST defaults to mean when no flag is set
        active = [k for k in ST_LONG_KEYS if cfg.get(f"pooling_mode_{k}", False)] or ["mean_tokens"]
    if len(active) != 1 or active[0] not in ST_TO_OURS:
        raise ValueError(
            f"{path}: pooling {active} is not supported; embedcore pools with exactly one of "
            f"{sorted(ST_TO_OURS)} (ours: {sorted(OURS_TO_ST)})"
        )
    if cfg.get("include_prompt", True) is False:
        raise ValueError(f"{path}: include_prompt=false (prompt tokens left out of pooling) is not supported; "
                         f"embedcore pools over every real token")
    return ST_TO_OURS[active[0]]


def read_sentence_transformers_folder(path: str) -> dict[str, Any]:
    """Settings of a sentence-transformers folder.

    Returns transformer_path, pooling (ours), l2_normalize, query_prefix, passage_prefix (None when the
    folder has no such prompt), max_seq_length (None when unset). Modules other than Transformer /
    Pooling / Normalize (Dense, ...) are refused: training without them would silently change the model.
    """
    modules_file = os.path.join(path, "modules.json")
    modules = _read_json(modules_file, "sentence-transformers modules")
    if not isinstance(modules, list):
        raise ValueError(f"{modules_file}: expected a JSON list of modules")
    transformer_path = pooling = None
    normalize = False
    for i, mod in enumerate(modules):
        kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
        sub = os.path.join(path, mod.get("path", ""))
        if kind == "Transformer" and i == 0:
            transformer_path = os.path.normpath(sub)
        elif kind == "Pooling" and transformer_path is not None and pooling is None:
            pooling = _pooling_from_config(_read_json(os.path.join(sub, "config.json"), "pooling config"),
                                           os.path.join(sub, "config.json"))
        elif kind == "Normalize" and pooling is not None:
            normalize = True
        else:
            raise ValueError(
                f"{modules_file}: module {i} of type {mod.get('type')!r} is not supported here; embedcore "
                f"reads Transformer, then Pooling, then optionally Normalize"
            )
    if transformer_path is None or pooling is None:
        raise ValueError(f"{modules_file}: needs a Transformer module first and a Pooling module")
    prompts: dict = {}
    st_cfg_file = os.path.join(path, "config_sentence_transformers.json")
    if os.path.isfile(st_cfg_file):
        prompts = _read_json(st_cfg_file, "sentence-transformers config").get("prompts") or {}
    max_seq_length = None
    sb_file = os.path.join(transformer_path, "sentence_bert_config.json")
    if os.path.isfile(sb_file):
        sb = _read_json(sb_file, "sentence-transformers Transformer config")
        max_seq_length = sb.get("max_seq_length")
        task = sb.get("transformer_task", "feature-extraction")
        if task != "feature-extraction":
            raise ValueError(f"{sb_file}: transformer_task {task!r} is not an embedding model")
        if sb.get("do_lower_case"):
            log.warning("%s: do_lower_case=true; embedcore does not lowercase text itself (the tokenizer may)", sb_file)
    passage_prompt = prompts.get("document", prompts.get("passage"))
    return {
        "transformer_path": transformer_path,
        "pooling": pooling,
        "l2_normalize": normalize,
        "query_prefix": prompt_to_prefix(prompts.get("query"), st_cfg_file),
        "passage_prefix": prompt_to_prefix(passage_prompt, st_cfg_file),
        "max_seq_length": max_seq_length,
    }


EMBEDCORE_SETTINGS = "embedcore_biencoder.json"
SETTINGS_KEYS = ("pooling", "l2_normalize", "query_prefix", "passage_prefix", "max_seq_length")


def read_embedcore_settings(path: str) -> dict[str, Any] | None:
    """The settings our export wrote to embedcore_biencoder.json (exact, colbert included), or None."""
    f = os.path.join(path, EMBEDCORE_SETTINGS)
    if not os.path.isfile(f):
        return None
    cfg = _read_json(f, "embedcore biencoder settings")
    missing = [k for k in SETTINGS_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{f}: missing keys {missing}")
    return {k: cfg[k] for k in SETTINGS_KEYS}


def write_embedcore_settings(out_dir: str, **settings) -> None:
    """Record our own settings (pooling, prefixes, padding side, ...) beside the export."""
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    if missing:
        raise ValueError(f"write_embedcore_settings: missing {missing}")
    write_json(os.path.join(out_dir, EMBEDCORE_SETTINGS), settings, indent=2)


def write_sentence_transformers_files(
    out_dir: str,
    embedding_dim: int,
    pooling: str,
    l2_normalize: bool,
    query_prefix: str | None,
    passage_prefix: str | None,
    max_seq_length: int | None,
) -> None:
    """Write the sentence-transformers files (see module docstring) next to a saved HF model in out_dir."""
    if pooling == "colbert":
        raise ColbertNotExportable(
            "colbert pooling has no sentence-transformers Pooling equivalent (it keeps one vector per token)"
        )
    if pooling not in OURS_TO_ST:
        raise ValueError(f"cannot export pooling {pooling!r}; expected one of {sorted(OURS_TO_ST)} or colbert")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if l2_normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    write_json(os.path.join(out_dir, "modules.json"), modules, indent=2)
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    pool_cfg: dict[str, Any] = {"word_embedding_dimension": int(embedding_dim)}
    pool_cfg.update({f"pooling_mode_{k}": (k == OURS_TO_ST[pooling]) for k in ST_LONG_KEYS})
    pool_cfg["include_prompt"] = True
    write_json(os.path.join(out_dir, "1_Pooling", "config.json"), pool_cfg, indent=2)
    prompts = {k: p for k, p in (("query", prefix_to_prompt(query_prefix)),
                                 ("document", prefix_to_prompt(passage_prefix))) if p is not None}
    write_json(os.path.join(out_dir, "config_sentence_transformers.json"), {
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if l2_normalize else "dot",
    }, indent=2)
    sb: dict[str, Any] = {"do_lower_case": False}
    if max_seq_length is not None:
        sb = {"max_seq_length": int(max_seq_length), **sb}
    write_json(os.path.join(out_dir, "sentence_bert_config.json"), sb, indent=2)

"""PEFT-format LoRA adapters: adapter_config.json + adapter_model.safetensors.

Key mapping (PEFT's, for a model wrapped as PeftModel(base)): the LoRA factors of the module at
dotted path <path> of the base model are stored as

    base_model.model.<path>.lora_A.weight   [r, in]
    base_model.model.<path>.lora_B.weight   [out, r]

so an adapter saved from a bare backbone (LlamaModel, BertModel, ...) with LoRA applied here
loads with `peft.PeftModel.from_pretrained(<same backbone class>, dir)`, and the other way round.
Supported: PEFT's plain LoRA (one r and alpha for all layers, no rslora/DoRA, bias "none").
PEFT itself is not needed to save or load.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from embedcore.distributed import is_main
from embedcore.files import write_json
from embedcore.lora.apply import LoRASummary, apply_lora, count_params, lora_layers, matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json keys whose non-default values need features we do not implement.
_UNSUPPORTED = {
    "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
    "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    "trainable_token_indices": None, "target_parameters": None, "layer_replication": None, "use_qalora": False,
}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy (a DTensor shard under FSDP2 is gathered first: a collective)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def _target_modules_value(model: nn.Module, names: list[str]):
    """The exact replaced names as a list, PEFT's readable form, unless one of them would also
    suffix-match another linear layer; then an anchored regex that matches exactly these."""
    chosen = set(names)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    if any(matches(o, names) for o in others):
        return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    return sorted(names)


def _uniform(layers: dict, attr: str):
    values = {getattr(m, attr) for m in layers.values()}
    if len(values) != 1:
        raise ValueError(f"save_adapter: all LoRA layers must share one {attr} for the PEFT format, found {sorted(values)}")
    return values.pop()


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None) -> list[str]:
    """Write the LoRA layers of `model` as a PEFT adapter in `directory` (created if needed).

    Under FSDP2 call it on every rank (sharded factors are gathered); rank 0 writes.
    Returns the paths written (empty on other ranks).
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRA layers (apply_lora or load_adapter first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"save_adapter: LoRA layer {merged[0]!r} is merged into its base weight; unmerge() it first")
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _full(m.lora_A.weight)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _full(m.lora_B.weight)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": _uniform(layers, "r"),
        "lora_alpha": _uniform(layers, "lora_alpha"),
        "lora_dropout": _uniform(layers, "lora_dropout"),
        "target_modules": _target_modules_value(model, list(layers)),
        "exclude_modules": None,
        "init_lora_weights": True,
        "layers_pattern": None,
        **_UNSUPPORTED,
    }
    if not is_main():
        return []
    os.makedirs(directory, exist_ok=True)
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    save_file(tensors, weights_path, metadata={"format": "pt"})
    write_json(config_path, config, indent=2, sort_keys=True)
    return [config_path, weights_path]


def read_adapter_config(directory: str) -> dict:
    """adapter_config.json of `directory`, checked for features this loader supports."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r} (not a PEFT adapter folder)")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, None) and not (isinstance(default, (dict, list)) and not value):
            raise ValueError(f"{path}: {key}={value!r} is not supported (only {key}={default!r}); "
                             "plain LoRA adapters load here")
    return config


def load_adapter(model: nn.Module, directory: str, backend: str | None = None) -> LoRASummary:
    """Load a PEFT LoRA adapter into `model` (in place).

    If the model has no LoRA layers yet they are applied per adapter_config.json (target_modules,
    exclude_modules, r, lora_alpha, lora_dropout; everything else frozen); otherwise the existing
    layers must be exactly the adapter's. Every key of the weights file must land on a LoRA layer
    and every LoRA layer must get both factors; errors name the key and the file.
    """
    from safetensors.torch import load_file

    config = read_adapter_config(directory)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r} (only the safetensors format is read)")
    layers = lora_layers(model)
    if not layers:
        target = config["target_modules"]
        all_linear = target == "all-linear"
        apply_lora(model, target_modules=None if all_linear else target, exclude_modules=config.get("exclude_modules"),
                   match_all_linear=all_linear, r=int(config["r"]), alpha=config["lora_alpha"],
                   dropout=float(config.get("lora_dropout") or 0.0), backend=backend, _strict_exclude=False)
        layers = lora_layers(model)
    else:
        for name, layer in layers.items():
            if layer.r != int(config["r"]) or layer.lora_alpha != config["lora_alpha"]:
                raise ValueError(f"{directory}: adapter has r={config['r']}, lora_alpha={config['lora_alpha']} but the "
                                 f"model's LoRA layer {name!r} has r={layer.r}, alpha={layer.lora_alpha}")
    state = load_file(weights_path)
    filled: dict[str, set] = {name: set() for name in layers}
    for key, tensor in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights_path}: key {key!r} is not a LoRA factor 'base_model.model.<path>.lora_A|B.weight'")
        path, factor = m.group(1), m.group(2)
        if path not in layers:
            raise ValueError(f"{weights_path}: key {key!r} names module {path!r}, which is not a LoRA layer of "
                             f"{type(model).__name__} (its LoRA layers look like {next(iter(layers))!r})")
        param = getattr(layers[path], factor).weight
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{weights_path}: key {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(param.shape)} (r={layers[path].r})")
        with torch.no_grad():
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        filled[path].add(factor)
    missing = [f"{name}.{f}" for name, got in filled.items() for f in ("lora_A", "lora_B") if f not in got]
    if missing:
        raise ValueError(f"{weights_path}: no weights for LoRA layer(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    trainable, total = count_params(model)
    first = next(iter(layers.values()))
    return LoRASummary(replaced=list(layers), trainable_params=trainable, total_params=total, r=first.r,
                       alpha=first.lora_alpha, dropout=first.lora_dropout)


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every LoRA layer into its base weight and put a plain nn.Linear back in its place
    (sharing the merged weight, no copy). The model is then a vanilla model again, ready for
    save_pretrained / sentence-transformers export; no adapter files are involved.
    Returns the names of the merged layers."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged_linear())
    return list(layers)

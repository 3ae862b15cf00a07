"""apply_lora: put LoRALinear layers into any torch / transformers model and freeze the rest.

Module matching follows PEFT's rules, so a `target_modules` value means the same thing here, in
an adapter_config.json and in PEFT:
  - a list of names: a module matches an entry when its full dotted name equals the entry or
    ends with "." + entry ("q_proj" matches "layers.0.self_attn.q_proj");
  - a string: a regular expression that must match the full dotted name (re.fullmatch);
  - match_all_linear=True (PEFT's "all-linear"): every nn.Linear except the output embedding
    layer (an LM head), when the model has one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from embedcore.nn.lora import LoRALinear, check_lora_hparams


@dataclass
class LoRASummary:
    """What apply_lora did."""

    replaced: list[str] = field(default_factory=list)  # dotted names of the layers now LoRALinear
    trainable_params: int = 0  # parameters with requires_grad after freezing (the LoRA factors)
    total_params: int = 0  # all parameters of the model, LoRA included
    r: int = 0
    alpha: float = 0.0
    dropout: float = 0.0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (f"LoRA r={self.r} alpha={self.alpha} dropout={self.dropout} on {len(self.replaced)} layers: "
                f"trainable {self.trainable_params:,} / {self.total_params:,} params ({100 * self.trainable_fraction:.3f}%)")


def matches(name: str, patterns) -> bool:
    """PEFT's matching rule for one module name (see the module docstring)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_patterns(value, what: str):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(p, str) and p for p in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{what} must be a list of module names or a regex string, got {value!r}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{dotted name: LoRALinear} of a model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules outside any LoRALinear (its factor holders are never targets)."""
    out, inside = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALinear):
            inside.append(name)
        out[name] = module
    return out


def _output_embedding_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, m in modules.items() if head is not None and m is head}


def _example_names(linears: list[str], n: int = 6) -> str:
    shown = ", ".join(linears[:n])
    return shown + (", ..." if len(linears) > n else "") if linears else "(the model has no nn.Linear)"


def select_targets(model: nn.Module, target_modules=None, exclude_modules=None, match_all_linear=False,
                   strict_exclude: bool = True) -> list[str]:
    """Dotted names of the nn.Linear layers apply_lora would replace; errors say what was expected."""
    target_modules = _check_patterns(target_modules, "target_modules")
    exclude_modules = _check_patterns(exclude_modules, "exclude_modules")
    if match_all_linear and target_modules is not None:
        raise ValueError("give either target_modules or match_all_linear=True, not both")
    if not match_all_linear and target_modules is None:
        raise ValueError("apply_lora needs target_modules (names like ['q_proj', 'v_proj'] or a regex) "
                         "or match_all_linear=True")
    modules = _candidate_modules(model)
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if match_all_linear:
        heads = _output_embedding_names(model, modules)
        chosen = [n for n in linears if n not in heads]
    else:
        entries = [target_modules] if isinstance(target_modules, str) else target_modules
        for entry in entries:
            hit = [n for n in modules if matches(n, entry if isinstance(target_modules, str) else [entry])]
            if not hit:
                raise ValueError(f"target_modules entry {entry!r} matches no module of {type(model).__name__}; "
                                 f"its linear layers are named like: {_example_names(linears)}")
            wrong = [(n, type(modules[n]).__name__) for n in hit if not isinstance(modules[n], nn.Linear)]
            if wrong:
                raise ValueError(f"target_modules entry {entry!r} matches {wrong[0][0]!r} of type {wrong[0][1]}; "
                                 f"LoRA targets must be nn.Linear layers (e.g. {_example_names(linears, 3)})")
        chosen = [n for n in linears if matches(n, target_modules)]
    if exclude_modules is not None:
        if strict_exclude and not isinstance(exclude_modules, str):
            for entry in exclude_modules:
                if not any(matches(n, [entry]) for n in modules):
                    raise ValueError(f"exclude_modules entry {entry!r} matches no module of {type(model).__name__}")
        chosen = [n for n in chosen if not matches(n, exclude_modules)]
    if not chosen:
        raise ValueError(f"no linear layer left to adapt after applying target/exclude patterns "
                         f"(target_modules={target_modules!r}, exclude_modules={exclude_modules!r}, "
                         f"match_all_linear={match_all_linear})")
    return chosen


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared Parameter counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def apply_lora(model: nn.Module, target_modules=None, exclude_modules=None, match_all_linear: bool = False,
               r: int = 16, alpha: float = 32, dropout: float = 0.0, backend: str | None = None,
               _strict_exclude: bool = True) -> LoRASummary:
    """Replace the matching nn.Linear layers of `model` by LoRALinear (in place) and freeze every
    parameter except the LoRA factors.

    target_modules: list of module names (suffix match) or a regex (full match), PEFT's rules;
    exclude_modules: the same, removed from the targets; match_all_linear: every nn.Linear except
    an output-embedding head. r > 0, alpha > 0, dropout in [0, 1). Raises ValueError when a
    target entry matches nothing, when the model already has LoRA layers, or on bad hparams.
    Returns a LoRASummary (replaced names, trainable and total parameter counts).
    """
    check_lora_hparams(r, alpha, dropout)
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"{type(model).__name__} already has LoRA layers (e.g. {next(iter(existing))!r}); "
                         "apply_lora runs once per model (merge_lora first to start again)")
    names = select_targets(model, target_modules, exclude_modules, match_all_linear, strict_exclude=_strict_exclude)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, backend=backend))
    trainable, total = count_params(model)
    return LoRASummary(replaced=names, trainable_params=trainable, total_params=total, r=r, alpha=alpha,
                       dropout=float(dropout))

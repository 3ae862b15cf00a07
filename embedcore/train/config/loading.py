"""Loading a config: YAML file + dotted command-line overrides -> a typed dataclass.

`load_config(path, overrides)` is the trainer's; `load_yaml_with_overrides(path, overrides,
schema_cls, section)` is the same loader for any dataclass schema (the mining CLI's `mining:`
file). Every key is checked: an unknown key or a value of the wrong type is a ConfigError
naming the dotted key (`optimizer.lr`); a missing or malformed file names the file.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from embedcore.errors import ConfigError
from embedcore.train.config.schema import TrainConfig
from embedcore.train.config.validation import validate


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the key.
# --------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """value checked against (and converted to) the type hint tp; ConfigError naming key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own error names the inner key (peft.dim, not peft)
            return _convert(value, others[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [str(value)]  # data_dir_list: a single path is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this file, not in the config


def build_section(cls, data, key: str = ""):
    """An instance of dataclass `cls` from a mapping; unknown keys and wrong types raise."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping (section), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys{' of ' + key if key else ''}: {', '.join(names)})"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Dotted overrides.
# --------------------------------------------------------------------------------------------
def _field_type(cls, parts: list[str], key: str):
    """The type hint of a dotted key, walking through (Optional) sections."""
    tp = cls
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is Any:
                return Any  # free-form mapping (e.g. build_tiny_if_missing.options)
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            section = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{key}: unknown key {part!r} in {section} (known: {', '.join(hints)})")
        tp = hints[part]
    return tp


def _strip_optional(tp):
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_override_value(text: str, tp):
    """A command-line string as a value for a field of type tp (YAML syntax; strings stay as typed)."""
    if _strip_optional(tp) is str and text.lower() not in ("null", "~"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """`--a.b value` / `--a.b=value` command-line words as (dotted key, value text) pairs."""
    pairs, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --dotted.key value")
        if "=" in arg:
            pairs.append(tuple(arg[2:].split("=", 1)))
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override {arg}: missing a value")
            pairs.append((arg[2:], overrides[i + 1]))
            i += 2
    return pairs


def apply_overrides(data: dict, overrides: list[str], schema_cls=TrainConfig) -> dict:
    """Apply `--a.b.c value` (or `--a.b.c=value`) pairs to the raw mapping `data` (in place);
    the schema's type of each key decides how its text is read."""
    for key, text in split_overrides(overrides):
        parts = key.split(".")
        tp = _field_type(schema_cls, parts, key)
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: cannot set a key inside a non-mapping value")
        node[parts[-1]] = parse_override_value(text, tp)
    return data



# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------
def read_yaml(path: str):
    """The parsed YAML file at `path` (an empty file: {}); ConfigError naming the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return {} if data is None else data


@functools.lru_cache(maxsize=None)
def _file_of_one_section(schema_cls, section: str):
    """A schema whose only key is `section` (of type schema_cls): the dotted keys and their errors
    then read `section.key`, as in the file."""
    return dataclasses.make_dataclass(f"{section}_file", [(section, schema_cls)])


def load_yaml_with_overrides(path: Optional[str], overrides: Optional[list[str]], schema_cls,
                             section: Optional[str] = None):
    """A `schema_cls` instance from the YAML file at `path` (None: no file, the defaults) with the
    `--dotted.key value` overrides applied. With `section`, the file holds that one top-level
    section and the keys are spelt `section.key` (`--mining.mining_batch_size 64`). Only types
    are checked here; checks across keys are the caller's."""
    data = {} if path is None else read_yaml(path)
    schema = schema_cls
    if section is None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    else:
        if not isinstance(data, dict) or set(data) - {section}:
            raise ConfigError(f"{path}: expected a single top-level section {section!r}")
        schema = _file_of_one_section(schema_cls, section)
        data.setdefault(section, None)  # built (and checked) even when absent: build_section reads None as {}
    apply_overrides(data, list(overrides or []), schema)
    built = build_section(schema, data)
    return built if section is None else getattr(built, section)


def config_from_dict(data: dict) -> TrainConfig:
    """TrainConfig from a raw mapping, with the cross-section checks."""
    cfg = build_section(TrainConfig, data)
    validate(cfg)
    return cfg


def load_config(path: str, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read the YAML config at `path`, apply dotted overrides, check and build it."""
    cfg = load_yaml_with_overrides(path, overrides, TrainConfig)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """The config as plain data (for the checkpoint's state.json)."""
    return dataclasses.asdict(cfg)

"""Dtype names as configs and command lines spell them ("bfloat16", or "torch.bfloat16" as Hugging
Face configs write it) -> torch dtypes: one map for the trainer, the model loader and retrieval."""
from __future__ import annotations

import torch

from embedcore.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(value: str | torch.dtype, key: str = "dtype") -> torch.dtype:
    """The torch dtype named by `value` (a torch dtype passes through); ConfigError naming `key`
    (the config key or flag the name came from) for any other name."""
    if isinstance(value, torch.dtype):
        return value
    dtype = DTYPES.get(str(value).removeprefix("torch."))
    if dtype is None:
        raise ConfigError(f"{key}: unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return dtype

"""FSDP2 wrapping of the model for training (`shard_model`).

The process group, the rank checks and the collectives are embedcore.distributed, shared with
mining, evaluation and adapter saving; only what is FSDP-specific lives here.
"""
from __future__ import annotations

import torch

from embedcore.distributed import DistInfo



def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], info: DistInfo, compute_dtype: torch.dtype,
                forward_methods: tuple[str, ...] = ("encode",)):
    """FSDP2: fully_shard each transformer block, then the root. On CUDA with a low-precision
    compute dtype, parameters are cast to it for compute while gradients are reduced in fp32
    (the fp32 master weights stay sharded). The root's `forward_methods` (the Biencoder is driven
    through encode(), not forward()) get FSDP's unshard/reshard hooks too. Returns the model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {}
    if info.device.type == "cuda" and compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model

"""Process group, FSDP2 wrapping and the collectives of the training loop.

One process without torchrun is a world of one: no process group, no sharding, the same code.
Under torchrun the process group is gloo on CPU and nccl on CUDA (nccl asked for on a machine
without CUDA falls back to gloo with a notice).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None


def init_distributed(backend: str = "nccl", timeout_minutes: float = 1.0, device: str | None = None) -> DistInfo:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group;
    without it, a single process on CUDA if available (or `device`), else CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None)
    if backend == "nccl" and not use_cuda:
        if rank == 0:
            log.warning("dist_env.backend: nccl needs CUDA; using gloo on this CPU machine")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if use_cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def destroy_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands every rank the gradient of its own slice,
    summed over the ranks that used it (all_reduce then slice: works on every backend)."""

    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's x (same shape on every rank) along dim 0, gradients flowing
    back to their owners. The identity with one process."""
    if not info.initialized or info.world_size == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's x (same shape) along dim 0, without gradients (ids, masks)."""
    if not info.initialized or info.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of x over ranks (in place, returned)."""
    if info.initialized and info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of x over ranks (in place, returned)."""
    if info.initialized and info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object on every rank."""
    if not info.initialized or info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

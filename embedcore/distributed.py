"""Ranks and collectives, shared by training, mining, evaluation and adapter saving.

One process without torchrun is a world of one: no process group, every collective the identity,
the same code. Under torchrun `init_distributed` starts the process group from the environment
(RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on CPU.

Two ways to ask "how many ranks", on purpose:
- the trainer holds the `DistInfo` that `init_distributed` returned and passes it to the
  collectives (`all_reduce_sum(x, info)`): where it stands is decided once, at start;
- mining and evaluation also run inside the trainer's process group (the evaluation at the end of
  training) and are library functions without a DistInfo: they call the collectives without one,
  and the running process group (if any) decides.
Collectives move tensors to the communication device when needed (nccl takes CUDA tensors only,
gloo CPU ones) and return them on the caller's device.
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
    started: bool = False  # init_distributed started the process group (so destroy_distributed ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None


# ------------------------------------------------------------------------------------------
# Start and end.
# ------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """This rank's compute device: CUDA device LOCAL_RANK when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_minutes: float = 1.0, device: str | None = None) -> DistInfo:
    """Read the torchrun environment and start the process group (unless one runs already: then
    join it, e.g. an evaluation inside the trainer's run); without torchrun, a single process.

    backend None: nccl on CUDA, gloo on CPU; nccl asked for on a machine without CUDA falls back
    to gloo with a notice. device: "cuda" / "cpu" to choose; None: CUDA if available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None)
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    elif backend == "nccl" and not use_cuda:
        if int(os.environ.get("RANK", "0")) == 0:  # only the trainer asks by name: its key is named
            log.warning("dist_env.backend: nccl needs CUDA; using gloo on this CPU machine")
        backend = "gloo"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if use_cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), started)


def destroy_distributed(info: DistInfo) -> None:
    """End the process group if `init_distributed` started it (one it joined is its owner's to end)."""
    if info.started and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# Rank checks. `info` None: the running process group decides (see the module docstring).
# ------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main(info: DistInfo | None = None) -> bool:
    """Rank 0 (or no process group): the rank that writes files and prints."""
    return info.is_main if info is not None else rank() == 0


def _spans_ranks(info: DistInfo | None) -> bool:
    return info.initialized and info.world_size > 1 if info is not None else is_distributed()


def _comm_device() -> torch.device:
    """nccl needs CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------
# Collectives: the identity in one process.
# ------------------------------------------------------------------------------------------
def barrier(info: DistInfo | None = None) -> None:
    if _spans_ranks(info):
        dist.barrier()


def _all_reduce(x: torch.Tensor, op, info: DistInfo | None) -> torch.Tensor:
    """x reduced over ranks in place (through a copy on the communication device when x lives
    elsewhere), and returned."""
    if not _spans_ranks(info):
        return x
    dev = _comm_device()
    if x.device == dev:
        dist.all_reduce(x, op=op)
        return x
    buf = x.to(dev)
    dist.all_reduce(buf, op=op)
    return x.copy_(buf)


def all_reduce_sum(x: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """Elementwise sum of x over ranks (in place, returned)."""
    return _all_reduce(x, dist.ReduceOp.SUM, info)


def all_reduce_max(x: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """Elementwise maximum of x over ranks (in place, returned)."""
    return _all_reduce(x, dist.ReduceOp.MAX, info)


def all_reduce_min(x: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """Elementwise minimum of x over ranks (in place, returned)."""
    return _all_reduce(x, dist.ReduceOp.MIN, info)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands every rank the gradient of its own slice,
    summed over the ranks that used it (all_reduce then slice: works on every backend)."""

    @staticmethod
    def forward(ctx, x):
        world, rank_ = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank_, x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """Concatenate every rank's x (same shape on every rank, on the communication device) along
    dim 0, gradients flowing back to their owners."""
    if not _spans_ranks(info):
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor, info: DistInfo | None = None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's x (same shape) along `dim`, without gradients (ids, masks, top-k lists)."""
    if not _spans_ranks(info):
        return x
    buf = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    return torch.cat(parts, dim).to(x.device)


def gather_rows(local_index: torch.Tensor, local_rows: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank holds some rows (global positions local_index) of a [total, D] matrix; all get it whole.

    Rows are padded to the largest share for all_gather, so shares may differ in size."""
    if not is_distributed():
        out = local_rows.new_zeros((total, local_rows.shape[1]))
        out[local_index.to(out.device)] = local_rows
        return out
    dev = _comm_device()
    count = torch.tensor([local_rows.shape[0]], device=dev)
    most = int(gather_no_grad(count).max().item())
    dim = local_rows.shape[1]
    rows = torch.zeros((most, dim), dtype=local_rows.dtype, device=dev)
    rows[: local_rows.shape[0]] = local_rows.to(dev)
    idx = torch.full((most,), -1, dtype=torch.long, device=dev)
    idx[: local_index.shape[0]] = local_index.to(dev)
    all_rows, all_idx = gather_no_grad(rows).cpu(), gather_no_grad(idx).cpu()
    keep = all_idx >= 0
    out = local_rows.new_zeros((total, dim)).cpu()
    out[all_idx[keep]] = all_rows[keep].to(out.dtype)
    return out.to(local_rows.device)


def broadcast_object(obj, info: DistInfo | None = None):
    """Rank 0's Python object on every rank."""
    if not _spans_ranks(info):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

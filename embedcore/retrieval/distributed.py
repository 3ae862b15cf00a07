"""The few collectives mining and evaluation need, working with or without torch.distributed.

Single process (no process group): rank 0 of 1, every collective is the identity.
Under torchrun: `init_from_env` starts a process group (gloo on CPU, nccl when CUDA is there)
unless one is already running (for instance the trainer's, when evaluation runs at the end of
training). Thin on purpose: the trainer's distributed helpers are for FSDP training.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(backend: str | None = None, timeout_minutes: float = 30) -> bool:
    """Start a process group when launched by torchrun (WORLD_SIZE > 1) and none runs yet.

    Returns True when this call started it (the caller then ends it with `shutdown`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def shutdown(started: bool) -> None:
    """End the process group if `init_from_env` started it."""
    if started and dist.is_initialized():
        dist.destroy_process_group()


def default_device() -> torch.device:
    """This rank's compute device: its CUDA device under nccl / when CUDA exists, else CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(local_index: torch.Tensor, local_rows: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank holds some rows (global positions local_index) of a [total, D] matrix; all get it whole.

    Rows are padded to the largest share for all_gather, so shares may differ in size."""
    if not is_distributed():
        out = local_rows.new_zeros((total, local_rows.shape[1]))
        out[local_index.to(out.device)] = local_rows
        return out
    dev = _comm_device()
    count = torch.tensor([local_rows.shape[0]], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    dim = local_rows.shape[1]
    rows = torch.zeros((most, dim), dtype=local_rows.dtype, device=dev)
    rows[: local_rows.shape[0]] = local_rows.to(dev)
    idx = torch.full((most,), -1, dtype=torch.long, device=dev)
    idx[: local_index.shape[0]] = local_index.to(dev)
    all_rows = [torch.empty_like(rows) for _ in range(world_size())]
    all_idx = [torch.empty_like(idx) for _ in range(world_size())]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_idx, idx)
    out = local_rows.new_zeros((total, dim)).cpu()
    for r, i in zip(all_rows, all_idx):
        keep = i >= 0
        out[i[keep].cpu()] = r[keep].cpu().to(out.dtype)
    return out.to(local_rows.device)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """A reduced copy of t over ranks, on t's device (t itself in one process)."""
    if not is_distributed():
        return t
    buf = t.to(_comm_device()).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks (identity in one process)."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (identity in one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def barrier() -> None:
    if is_distributed():
        dist.barrier()

"""Resumable checkpoints: one folder per step, written atomically, and a LATEST pointer.

    checkpoint_dir/
      LATEST                    the name of the newest complete step folder (replaced atomically)
      step_20/
        model/model.safetensors the full (gathered) model state; LoRA runs: the trainable tensors only
        optim/optimizer.safetensors + optim/optimizer.json   AdamW state by parameter name
        rng/rank_<r>.safetensors + rng/rank_<r>.json         torch / CUDA / Python RNG of every rank
        state.json              step, epoch, sampler position, scheduler, world size, the config

A step folder is assembled under `.tmp_step_20` and renamed when complete, so a crash mid-save
never leaves a folder that looks complete; LATEST is updated only after the rename. Nothing is
pickled: tensors are safetensors, the rest JSON (no torch.load at all).

With FSDP2 the model and optimizer states are gathered with torch.distributed.checkpoint's
get_model_state_dict / get_optimizer_state_dict (full_state_dict, cpu_offload: rank 0 holds
them) and loaded back with set_model_state_dict / set_optimizer_state_dict.
"""
from __future__ import annotations

import json
import logging
import os
import random

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from embedcore.errors import CheckpointError
from embedcore.files import publish_folder, replace_text, staging_folder, write_json
from embedcore.distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger(__name__)

LATEST = "LATEST"
STATE_FILE = "state.json"


def step_folder_name(step: int) -> str:
    return f"step_{step}"


# ------------------------------------------------------------------------------- gathering
def full_model_state(model, trainable_only: bool) -> dict:
    """The model's full state dict on rank 0 (CPU tensors; other ranks get {} under FSDP).
    trainable_only (LoRA): only parameters that require grad."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=opts)


def full_optimizer_state(model, optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    """(tensors for safetensors, the rest as JSON) of an optimizer state keyed by parameter name."""
    tensors, scalars = {}, {}
    for name, st in osd.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}\t{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    return tensors, {"scalars": scalars, "param_groups": osd.get("param_groups", [])}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        name, k = key.split("\t", 1)
        state.setdefault(name, {})[k] = v
    for name, st in meta["scalars"].items():
        state.setdefault(name, {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_state(info: DistInfo) -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(info.device)
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict, meta: dict, info: DistInfo) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and info.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"], info.device)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------------- save
def save_checkpoint(checkpoint_dir: str, step: int, model, optimizer, scheduler, train_state: dict,
                    info: DistInfo, trainable_only: bool = False) -> str:
    """Write step folder `step_<step>` atomically and point LATEST at it. Collective: every rank
    calls it. train_state: JSON-able loop position (epoch, sampler state, ...). Returns the path."""
    final = os.path.join(checkpoint_dir, step_folder_name(step))
    model_sd = full_model_state(model, trainable_only)
    optim_sd = full_optimizer_state(model, optimizer)
    tmp = staging_folder(final, clear=info.is_main)  # rank 0 removes the remains of a save that crashed
    if info.is_main:
        for sub in ("model", "optim", "rng"):
            os.makedirs(os.path.join(tmp, sub))
    barrier(info)
    rng_tensors, rng_meta = _rng_state(info)
    save_file(rng_tensors, os.path.join(tmp, "rng", f"rank_{info.rank}.safetensors"))
    write_json(os.path.join(tmp, "rng", f"rank_{info.rank}.json"), rng_meta)
    if info.is_main:
        save_file({k: v.contiguous() for k, v in model_sd.items()}, os.path.join(tmp, "model", "model.safetensors"),
                  metadata={"format": "pt"})
        tensors, meta = _flatten_optimizer(optim_sd)
        save_file(tensors, os.path.join(tmp, "optim", "optimizer.safetensors"))
        write_json(os.path.join(tmp, "optim", "optimizer.json"), meta)
        state = {"step": step, "world_size": info.world_size, "trainable_only": trainable_only,
                 "scheduler": scheduler.state_dict(), **train_state}
    barrier(info)  # every rank's RNG file is in place before the folder is declared complete
    if info.is_main:
        write_json(os.path.join(tmp, STATE_FILE), state)  # written last: its presence marks completeness
        publish_folder(tmp, final)  # replaces a stale folder of the same step (a run resumed from an earlier one)
        replace_text(os.path.join(checkpoint_dir, LATEST), step_folder_name(step) + "\n")
    barrier(info)
    return final


# ------------------------------------------------------------------------------- restore
def resolve_restore(restore_from: str | None, checkpoint_dir: str) -> str | None:
    """The step folder to resume from: None (fresh start), LATEST (the pointer in checkpoint_dir;
    a fresh start, with a notice, when no checkpoint exists yet) or a step folder path."""
    if restore_from is None:
        return None
    if restore_from == LATEST:
        folder = latest_folder(checkpoint_dir)
        if folder is None:
            log.warning("checkpoint.restore_from: LATEST but %s has no checkpoint yet; starting fresh", checkpoint_dir)
            return None
    else:
        folder = restore_from
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint.restore_from: {folder!r} does not exist")
    if not os.path.isfile(os.path.join(folder, STATE_FILE)):
        raise CheckpointError(f"checkpoint.restore_from: {folder!r} is not a complete checkpoint (no {STATE_FILE})")
    return folder


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(folder: str, model, optimizer, scheduler, info: DistInfo) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG from `folder`; returns state.json.
    Every rank reads the files (a filesystem shared by the ranks is assumed)."""
    state = read_state(folder)
    if state["world_size"] != info.world_size:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: RNG states are not restored",
                    folder, state["world_size"], info.world_size)
    model_sd = load_file(os.path.join(folder, "model", "model.safetensors"))
    trainable_only = bool(state.get("trainable_only"))
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=not trainable_only))
    tensors = load_file(os.path.join(folder, "optim", "optimizer.safetensors"))
    with open(os.path.join(folder, "optim", "optimizer.json"), encoding="utf-8") as f:
        meta = json.load(f)
    set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(tensors, meta),
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(folder, "rng", f"rank_{info.rank}.safetensors")
    if state["world_size"] == info.world_size and os.path.isfile(rng_file):
        with open(os.path.join(folder, "rng", f"rank_{info.rank}.json"), encoding="utf-8") as f:
            _set_rng_state(load_file(rng_file), json.load(f), info)
    return state


def latest_folder(checkpoint_dir: str) -> str | None:
    """The folder LATEST points to, or None."""
    pointer = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        return os.path.join(checkpoint_dir, f.read().strip())


class Checkpointer:
    """The run's checkpoints: when to save (every `every_steps`, and at the end), saving, resuming,
    and which folder is the last good one. Explicit arguments only; the weights' sanity is checked
    by the caller (DivergenceGuard) before `save`."""

    def __init__(self, ck, every_steps: int, info: DistInfo, trainable_only: bool):
        self.enabled, self.folder, self.restore_from = ck.enabled, ck.checkpoint_dir, ck.restore_from
        self.every_steps, self.info, self.trainable_only = every_steps, info, trainable_only
        self.last_saved: int | None = None  # step of this run's newest save (or of the restored one)

    def should_save(self, step: int) -> bool:
        return self.enabled and bool(self.every_steps) and step % self.every_steps == 0

    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> str:
        path = save_checkpoint(self.folder, step, model, optimizer, scheduler, train_state, self.info,
                               trainable_only=self.trainable_only)
        self.last_saved = step
        return path

    def restore(self, model, optimizer, scheduler) -> dict | None:
        """Load the checkpoint that checkpoint.restore_from names; its state.json, or None for a
        fresh run (then a folder that holds an earlier run is pointed out)."""
        folder = resolve_restore(self.restore_from, self.folder)
        if folder is None:
            previous = latest_folder(self.folder)
            if previous is not None and self.info.is_main:
                log.warning("checkpoint_dir %s holds an earlier run (LATEST -> %s): starting a fresh run there "
                            "(its logs restart, its step folders are replaced as this run reaches them); "
                            "--checkpoint.restore_from LATEST would resume it instead", self.folder,
                            os.path.basename(previous))
            return None
        state = load_checkpoint(folder, model, optimizer, scheduler, self.info)
        state["folder"] = folder
        self.last_saved = state["step"]
        return state

    def latest(self) -> str | None:
        return latest_folder(self.folder) if self.enabled else None

    def last_good(self) -> str:
        """Where a stopped run can resume from, for its error line."""
        last = self.latest()
        if last is None:
            return "no checkpoint was saved before it"
        return (f"the last good checkpoint is {last} (LATEST still points at it; resume with "
                f"--checkpoint.restore_from LATEST, perhaps with a lower optimizer.lr)")


__all__ = ["Checkpointer", "save_checkpoint", "load_checkpoint", "resolve_restore", "read_state", "latest_folder",
           "full_model_state", "CheckpointError", "broadcast_object"]

"""AdamW (fused where the device offers it) and the warmup-then-decay learning-rate schedule."""
from __future__ import annotations

import logging
import math

import torch

from embedcore.train.config import LRSchedulerConfig, OptimizerConfig, resolve_target

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Trainable parameters in two groups: matrices decay, biases and norm weights (1-D) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("optimizer: the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device, notice=log.warning):
    """torch AdamW (or Adam with L2 decay when adam_w_mode is false). FusedAdam from
    transformer_engine maps here; `fused` defaults to True on CUDA and False on CPU."""
    kind = resolve_target("optimizer", cfg._target_)
    if kind == "adam" and cfg._target_ and "FusedAdam" in cfg._target_ and device.type != "cuda":
        notice("optimizer._target_: FusedAdam needs CUDA; using torch.optim.AdamW on CPU")
    # torch has fused Adam kernels for CUDA and CPU; on CPU it is used only when asked for
    # (fused: true), since with FSDP's DTensor parameters the foreach path is the tested one.
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    decoupled = cfg.adam_w_mode if kind == "adam" else True
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if fused:
        kwargs["fused"] = True
    return cls(param_groups(model, cfg.weight_decay), **kwargs)


class WarmupDecaySchedule:
    """lr(step) for optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `lr_warmup_steps`, then cosine / linear decay to min_lr over lr_decay_steps (default: the
    remaining steps), or constant. The state is the step counter alone."""

    def __init__(self, optimizer, cfg: LRSchedulerConfig, peak_lr: float, total_steps: int):
        self.optimizer = optimizer
        self.warmup = cfg.lr_warmup_steps
        self.style = cfg.lr_decay_style
        self.min_lr = cfg.min_lr
        self.peak = peak_lr
        self.decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else max(total_steps - self.warmup, 1)
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.style == "constant":
            return self.peak
        t = min((step - self.warmup) / max(self.decay_steps, 1), 1.0)
        if self.style == "linear":
            factor = 1.0 - t
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr + (self.peak - self.min_lr) * factor

    def _apply(self):
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.lr_at(self.step_count)

    def step(self):
        """Advance after an optimizer step."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()

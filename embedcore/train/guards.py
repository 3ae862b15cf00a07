"""What stops a run before bad weights become a checkpoint, and how an interrupt stops it cleanly.

DivergenceGuard (config section `divergence:`):
- every step, on the device (no host sync): the first step whose loss or gradient norm is NaN/inf,
  and the largest loss and gradient norm since the last check;
- on log, validation and save steps (`check`): those maxima, reduced over ranks so that every rank
  takes the same decision, against the median of the earlier checks' maxima: a loss above
  `loss_spike_factor` x that median or a gradient norm above `grad_norm_spike_factor` x it is a
  blow-up, even when still finite (a learning rate of 1e10 gives finite but useless weights);
- before every save (`check_weights`): every trainable parameter and every optimizer state tensor
  finite, and no parameter larger in magnitude than `max_abs_weight`.
Any of these stops the run without writing the checkpoint, so LATEST keeps naming the last good one.

InterruptFlag: SIGINT / SIGTERM set a flag instead of killing the process; the loop finishes the
step in flight, asks every rank (one tiny all-reduce per step, only with several ranks, so that all
ranks stop after the same step), saves and exits with 128 + the signal number. A second signal
while the step finishes gets the default behaviour (a second Ctrl-C kills at once).
"""
from __future__ import annotations

import math
import signal
import statistics

import torch

from embedcore.distributed import DistInfo, all_reduce_max

# Checks with fewer earlier maxima than this compare against nothing (the first losses are the largest).
MIN_HISTORY = 3


class DivergenceGuard:
    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.first_bad_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.max_loss = torch.full((), -math.inf, dtype=torch.float64, device=device)
        self.max_norm = torch.full((), -math.inf, dtype=torch.float64, device=device)
        self.loss_history: list[float] = []
        self.norm_history: list[float] = []

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record optimizer step `step` (1-based) on the device."""
        loss, norm = loss.detach().double(), grad_norm.detach().double().to(loss.device)
        bad = ~torch.isfinite(loss) | ~torch.isfinite(norm)
        first = self.first_bad_step
        self.first_bad_step = torch.where(bad & (first < 0), torch.full_like(first, step), first)
        self.max_loss = torch.maximum(self.max_loss, torch.nan_to_num(loss, nan=math.inf))
        self.max_norm = torch.maximum(self.max_norm, torch.nan_to_num(norm, nan=math.inf))

    def check(self, info: DistInfo) -> str | None:
        """Why the run must stop (None: it may go on). Same answer on every rank."""
        stats = all_reduce_max(torch.stack([self.first_bad_step, self.max_loss, self.max_norm]), info)
        first_bad, max_loss, max_norm = stats.tolist()
        self.max_loss.fill_(-math.inf)
        self.max_norm.fill_(-math.inf)
        if first_bad >= 0:
            return f"the loss or gradient norm became NaN or inf at step {int(first_bad)}"
        if max_loss == -math.inf:
            return None  # nothing observed since the last check
        why = (self._spike("loss", max_loss, self.loss_history, self.cfg.loss_spike_factor, "loss_spike_factor")
               or self._spike("gradient norm", max_norm, self.norm_history, self.cfg.grad_norm_spike_factor,
                              "grad_norm_spike_factor"))
        self.loss_history.append(max_loss)
        self.norm_history.append(max_norm)
        return why

    @staticmethod
    def _spike(what: str, value: float, history: list, factor, key: str) -> str | None:
        if factor is None or len(history) < MIN_HISTORY:
            return None
        typical = statistics.median(history)
        if typical > 0 and value > factor * typical:
            return (f"the {what} blew up to {value:.4g}, more than divergence.{key}={factor:g} x its typical "
                    f"{typical:.4g} (set divergence.{key} higher, or null, if this is expected)")
        return None

    def check_weights(self, params: list, optimizer, info: DistInfo) -> str | None:
        """Why the current weights must not be saved (None: they may). Collective under FSDP: each
        rank checks its own shards and the verdict is reduced over ranks."""
        device = self.first_bad_step.device
        nonfinite_params = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite_optim = torch.zeros((), dtype=torch.float64, device=device)
        largest = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            local = _local(p.detach())
            if local.numel():
                nonfinite_params += (~torch.isfinite(local)).sum()
                largest = torch.maximum(largest, torch.nan_to_num(local.abs().max().double(), nan=0.0))
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    local = _local(value.detach())
                    nonfinite_optim += (~torch.isfinite(local)).sum()
        bad_params, bad_optim, largest = all_reduce_max(torch.stack([nonfinite_params, nonfinite_optim, largest]),
                                                        info).tolist()
        if bad_params:
            return f"{int(bad_params)} trainable weight values are NaN or inf"
        if bad_optim:
            return f"{int(bad_optim)} optimizer state values are NaN or inf"
        limit = self.cfg.max_abs_weight
        if limit is not None and largest > limit:
            return (f"a trainable weight has magnitude {largest:.4g}, above divergence.max_abs_weight={limit:g} "
                    f"(the run diverged; set the key higher, or null, if such weights are expected)")
        return None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class InterruptFlag:
    """Installs SIGINT/SIGTERM handlers that record the signal; `restore()` puts the old ones back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a library caller): signals stay as they are
                pass

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once

    def agreed(self, info: DistInfo) -> bool:
        """True when some rank was interrupted; then every rank's signum is set."""
        if info.world_size > 1 and info.initialized:
            flag = all_reduce_max(torch.tensor(float(self.signum), device=info.device), info)
            self.signum = int(flag.item())
        return self.signum != 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

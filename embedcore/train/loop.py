"""The training run: build, (resume), step, validate, checkpoint, export.

One optimizer step = `accum` micro-batches of local_batch_size queries on every rank, where
accum = global_batch_size / (local_batch_size x world). In each micro-batch every passage of
every rank is a candidate for every query (gathered with gradients flowing back to their
owners), copies of a query's positive are masked by passage id. Device values (loss, grad norm,
token counts, a non-finite flag) stay on the device and are read on log steps only.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field

import torch

from embedcore.cli import report_user_error
from embedcore.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted, UserError
from embedcore.train import build
from embedcore.files import check_writable_folder
from embedcore.train.checkpoint import Checkpointer
from embedcore.train.config import TrainConfig, compat_notices, to_dict, validate_world
from embedcore.distributed import DistInfo, all_reduce_sum, barrier, destroy_distributed, init_distributed
from embedcore.train.distributed import shard_model
from embedcore.train.guards import DivergenceGuard, InterruptFlag
from embedcore.train.evaluation import Evaluator
from embedcore.train.export import Exporter
from embedcore.train.logging import ProgressBar, RunLogger, peak_memory_gib, setup_logging
from embedcore.train.activation_checkpointing import apply_activation_checkpointing
from embedcore.train.grad_cache import cached_step
from embedcore.train.objective import build_objective
from embedcore.train.optim import WarmupDecaySchedule, build_optimizer
from embedcore.train.stream import BatchStream
from embedcore.train.validation import Validator

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run leaves behind."""
    step: int
    checkpoint: str | None
    export: dict = field(default_factory=dict)
    validations: list = field(default_factory=list)
    last_loss: float = float("nan")
    evaluation: dict | None = None  # the end-of-training retrieval metrics (evaluation: section)


def steps_per_epoch(n_examples: int, local: int, world: int, accum: int) -> int:
    """Optimizer steps in one epoch (incomplete global batches are dropped)."""
    return (n_examples // (local * world)) // accum


class Trainer:
    """A run: the model and optimizer, and the components that each own a part of it (objective,
    data stream, validator, checkpointer, exporter, evaluator, divergence guard, logger). Its own
    state is the step; the epoch and the data position follow from it. `run()` trains to the end
    and returns a RunResult."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        s = cfg.step_scheduler
        for line in compat_notices(cfg):
            self.notice(line)
        self.dtype = build.compute_dtype(cfg.model, info.device, self.notice)
        # Everything that can be checked without the model is checked before it is built.
        self.accum = validate_world(cfg, info.world_size)
        self.train_set = build.build_dataset(cfg, cfg.dataloader, train=True)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), s.local_batch_size, info.world_size, self.accum)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"step_scheduler.global_batch_size: {s.global_batch_size} is larger than the training set "
                f"({len(self.train_set)} examples after skipping): not one optimizer step per epoch"
            )
        self.evaluator = Evaluator(cfg.evaluation) if cfg.evaluation is not None else None  # checks its data now
        if cfg.checkpoint.enabled and info.is_main:
            check_writable_folder(cfg.checkpoint.checkpoint_dir)
        torch.manual_seed(cfg.seed)  # same on every rank: identical LoRA init before sharding
        random.seed(cfg.seed)
        build.maybe_build_tiny_model(cfg, info)
        self.model = build.build_model(cfg)
        self.tokenizer = build.build_tokenizer(cfg, self.model)
        dims = cfg.loss.matryoshka_dims
        if dims and max(dims) > self.model.embedding_dim:
            raise ConfigError(f"loss.matryoshka_dims: {max(dims)} exceeds the model's embedding dimension "
                              f"{self.model.embedding_dim}")
        self.lora = build.apply_peft(cfg, self.model) if cfg.peft is not None else None
        self.model.to(info.device)
        if cfg.distributed.activation_checkpointing:  # before sharding, as torchtitan does
            n = apply_activation_checkpointing(self.model)
            if info.is_main:
                log.info("distributed.activation_checkpointing: %d transformer blocks recompute their activations", n)
        sharded = info.world_size > 1  # distributed.strategy: fsdp2 is the only one
        if sharded:
            shard_model(self.model, self.model.transformer_blocks(), info, self.dtype)
        # FSDP mixed precision casts on CUDA; otherwise autocast gives the low-precision forward.
        use_autocast = self.dtype != torch.float32 and not (sharded and info.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(info.device.type, dtype=self.dtype)) if use_autocast \
            else contextlib.nullcontext

        self.objective = build_objective(cfg)
        loader, sampler = build.build_train_loader(cfg, self.train_set, build.build_collator(cfg.dataloader,
                                                                                              self.tokenizer), info)
        self.stream = BatchStream(loader, sampler, self.train_set, self.steps_per_epoch, self.accum)
        self.total_steps = self.steps_per_epoch * s.num_epochs
        if s.max_steps is not None:  # whichever ends first: max_steps or num_epochs
            self.total_steps = min(self.total_steps, s.max_steps)
        self.validator = None
        if cfg.validation_dataloader is not None:
            vdl = cfg.validation_dataloader
            self.validator = Validator(build.build_dataset(cfg, vdl, train=False),
                                       build.build_collator(vdl, self.tokenizer),
                                       vdl.batch_size or s.local_batch_size, self.objective, info,
                                       every_steps=s.val_every_steps, at_start=s.val_at_start, autocast=self.autocast)
        self.exporter = Exporter(cfg, self.tokenizer, build.export_prompts(cfg, self.train_set), info, sharded)

        self.optimizer = build_optimizer(self.model, cfg.optimizer, info.device, self.notice)
        self.scheduler = WarmupDecaySchedule(self.optimizer, cfg.lr_scheduler, cfg.optimizer.lr, self.total_steps)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.guard = DivergenceGuard(cfg.divergence, info.device)
        self.logger = RunLogger(cfg.checkpoint.checkpoint_dir, info.is_main)
        self.checkpointer = Checkpointer(cfg.checkpoint, s.ckpt_every_steps, info, trainable_only=self.lora is not None)
        self.step = 0
        state = self.checkpointer.restore(self.model, self.optimizer, self.scheduler)
        if state is None:
            self.logger.reset()
        else:
            if state["global_batch_size"] != s.global_batch_size:
                raise CheckpointError(f"checkpoint {state['folder']}: global_batch_size {state['global_batch_size']} "
                                      f"differs from step_scheduler.global_batch_size {s.global_batch_size}")
            self.step = state["step"]
            self.logger.truncate_after(self.step)
            if info.is_main:
                log.info("resumed from %s at step %d (epoch %d)", state["folder"], self.step,
                         self.step // self.steps_per_epoch)
        self.stream.start(self.step, None if state is None else state["sampler"])
        # Device-side bookkeeping, read on log steps only (no host sync per step).
        self.interval_tokens = torch.zeros((), dtype=torch.float64, device=info.device)  # real tokens encoded
        self.interval_padded = torch.zeros((), dtype=torch.float64, device=info.device)  # padding included

    # ------------------------------------------------------------------ helpers
    def notice(self, msg: str) -> None:
        if self.info.is_main:
            log.warning(msg)

    @property
    def epoch(self) -> int:
        return self.stream.epoch_of(self.step)

    def _check_finite(self) -> None:
        """Stop (TrainingDiverged) if a step's loss or gradient norm was NaN/inf, or a divergence
        guard tripped. Reads device values: called on log, validation and save steps only."""
        why = self.guard.check(self.info)
        if why:
            raise TrainingDiverged(f"training stopped at step {self.step}: {why}; {self.checkpointer.last_good()}")

    def _micro_step(self, batch: dict, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (`last`: the last of the optimizer step)."""
        chunk = self.cfg.train.grad_cache.chunk_size
        if chunk:  # cached encoding: encoder memory bounded by the chunk (embedcore.train.grad_cache)
            r = cached_step(self.model, self.objective, batch, chunk, self.info, autocast=self.autocast,
                            loss_scale=1.0 / self.accum, last_micro_batch=last)
            self.interval_tokens += r.real_tokens
            self.interval_padded += r.padded_tokens
            return r.loss
        with self.autocast():
            q = self.model.encode(batch["q_input_ids"], batch["q_attention_mask"], "query")
            p = self.model.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
        loss = self.objective.train_loss(q, batch["q_attention_mask"], p, batch["p_attention_mask"],
                                         batch.get("passage_ids"), self.info, teacher_scores=batch.get("teacher_scores"))
        (loss / self.accum).backward()
        self.interval_tokens += batch["q_attention_mask"].sum() + batch["p_attention_mask"].sum()
        self.interval_padded += batch["q_attention_mask"].numel() + batch["p_attention_mask"].numel()
        return loss.detach()

    def _optimizer_step(self, micro: list) -> tuple:
        """One optimizer step over the micro-batches: (mean loss, gradient norm, lr), on the device."""
        loss = torch.stack([self._micro_step(build.batch_to_device(b, self.info.device), last=k == len(micro) - 1)
                            for k, b in enumerate(micro)]).mean()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.current_lr
        self.scheduler.step()
        return loss, grad_norm, lr

    def _clip(self) -> torch.Tensor:
        max_norm = self.cfg.optimizer.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm if max_norm is not None else math.inf)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _validate(self) -> dict:
        self._check_finite()
        record = {"step": self.step, "epoch": self.epoch, **self.validator.run(self.model)}
        self.logger.validation(record)
        return record

    def _save(self) -> str | None:
        if not self.cfg.checkpoint.enabled:
            return None
        self._check_finite()  # never save weights that went through a NaN/inf step or a blow-up
        why = self.guard.check_weights(self.trainable, self.optimizer, self.info)
        if why:  # nothing is written: LATEST keeps naming the last good checkpoint
            raise TrainingDiverged(f"training stopped at step {self.step}, checkpoint not saved: {why}; "
                                   f"{self.checkpointer.last_good()}")
        train_state = {"sampler": self.stream.state_dict(), "global_batch_size": self.cfg.step_scheduler.global_batch_size,
                       "config": to_dict(self.cfg)}
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, train_state)

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        info, s = self.info, self.cfg.step_scheduler
        result = RunResult(step=self.step, checkpoint=None)
        # Restored from a run that had already finished: the export is rewritten (atomically, the
        # same files) so the result names it, but its evaluation record is not appended twice.
        finished_before = 0 < self.total_steps <= self.step
        if info.is_main:
            log.info("training: %d step(s) (%d per epoch), %d rank(s), global batch %d = %d local x %d accumulation "
                     "x %d rank(s), device %s, compute dtype %s", self.total_steps, self.steps_per_epoch,
                     info.world_size, s.global_batch_size, s.local_batch_size, self.accum, info.world_size,
                     info.device, str(self.dtype).replace("torch.", ""))
        if self.validator is not None and self.validator.at_start and self.step == 0:
            result.validations.append(self._validate())
        last_validated = self.step
        bar = ProgressBar(self.total_steps, self.step, info.is_main)
        self.model.train()
        stop = InterruptFlag()
        t0, steps_in_interval = time.perf_counter(), 0
        while self.step < self.total_steps and not stop.agreed(info):
            loss, grad_norm, lr = self._optimizer_step(self.stream.next_step())
            self.guard.observe(self.step + 1, loss, grad_norm)
            self.step += 1
            steps_in_interval += 1
            bar.update()
            if self.step % s.log_every_steps == 0 or self.step == self.total_steps:
                result.last_loss = self._log(loss, grad_norm, lr, t0, steps_in_interval)
                self._check_finite()
                t0, steps_in_interval = time.perf_counter(), 0
            if self.validator is not None and self.validator.should_run(self.step):
                result.validations.append(self._validate())
                last_validated = self.step
            if self.checkpointer.should_save(self.step):
                result.checkpoint = self._save()
        bar.close()
        stop.restore()
        if stop.signum:
            self._stop_on_interrupt(stop.signum)
        self._check_finite()
        if self.validator is not None and last_validated != self.step:
            result.validations.append(self._validate())
        if self.cfg.checkpoint.enabled:
            if self.checkpointer.last_saved != self.step:
                result.checkpoint = self._save()
            result.checkpoint = result.checkpoint or self.checkpointer.latest()
            result.export = self.exporter.export(self.model, result.checkpoint)
        if self.evaluator is not None and finished_before:
            if info.is_main:
                log.info("step %d: the restored run had already finished and been evaluated; not evaluating again",
                         self.step)
        elif self.evaluator is not None:  # config validation made sure the consolidated export exists
            # The run is over: AdamW's moments (twice the trainable weights) make room for the
            # evaluation's own copy of the model.
            self.optimizer.state.clear()
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
            result.evaluation = {"step": self.step, "epoch": self.epoch,
                                 **self.evaluator.run(result.export["consolidated"])}
            self.logger.evaluation(result.evaluation, self.cfg.evaluation.metrics)
        result.step = self.step
        return result

    def _stop_on_interrupt(self, signum: int) -> None:
        """After SIGINT/SIGTERM: the step in flight was finished; save it (unless
        checkpoint.save_on_interrupt is false) and stop with exit code 128 + signal."""
        ck = self.cfg.checkpoint
        name = signal.Signals(signum).name
        if ck.enabled and ck.save_on_interrupt:
            path = self.checkpointer.latest() if self.checkpointer.last_saved == self.step else self._save()
            where = f"checkpoint {path} saved; resume with --checkpoint.restore_from LATEST"
        else:
            where = "no checkpoint saved (checkpoint.save_on_interrupt or checkpoint.enabled is false)"
        raise TrainingInterrupted(f"interrupted by {name} at step {self.step}: {where}", 128 + signum)

    def _log(self, loss, grad_norm, lr, t0, steps) -> float:
        extra = self.objective.stats()  # e.g. fn_masked: candidates the false-negative filter left out
        stats = torch.stack([loss.double(), grad_norm.double().to(loss.device), self.interval_tokens.to(loss.device),
                             self.interval_padded.to(loss.device), *(v.double().to(loss.device) for v in extra.values())])
        all_reduce_sum(stats, self.info)
        loss_v, norm_v, tokens, padded, *extra_v = stats.tolist()
        loss_v /= self.info.world_size
        norm_v /= self.info.world_size  # the same global norm on every rank
        elapsed = time.perf_counter() - t0
        self.interval_tokens.zero_()
        self.interval_padded.zero_()
        record = {"step": self.step, "epoch": self.epoch, "loss": loss_v, "grad_norm": norm_v, "lr": lr,
                  "mem_gib": peak_memory_gib(self.info.device), "time_s": elapsed / max(steps, 1),
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "padded_tokens_per_s": padded / max(elapsed, 1e-9), **{k: int(v) for k, v in zip(extra, extra_v)}}
        self.logger.train(record)
        return loss_v


def train(cfg: TrainConfig) -> RunResult:
    """Run training as configured (under torchrun or in a single process)."""
    info = init_distributed(cfg.dist_env.backend, cfg.dist_env.timeout_minutes)
    setup_logging(info.is_main)
    try:
        result = Trainer(cfg, info).run()
        # Leave together. A gloo worker thread drops its reference to the last collective's
        # tensors after the caller has returned from it, and needs the GIL for that; a rank that
        # went straight from its last all_gather (the end-of-training evaluation) to exit
        # aborted in interpreter shutdown ("terminate called without an active exception") in
        # about 1 run in 6 here. Waiting in a barrier releases the GIL until every rank is done.
        barrier(info)
        return result
    except UserError as e:
        if e.same_on_every_rank and info.initialized:  # divergence, interrupt: every rank is here
            report_user_error(e)  # rank 0 says it before any rank exits (see report_user_error)
            barrier(info)
        raise
    finally:
        destroy_distributed(info)


__all__ = ["train", "Trainer", "RunResult", "TrainingDiverged", "steps_per_epoch"]

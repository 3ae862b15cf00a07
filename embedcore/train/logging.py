"""Training and validation log lines (the reference's format) and their JSONL records.

    step 10 | epoch 0 | loss 2.1543 | grad_norm 1.2345 | lr 5.00e-06 | mem 24.50 GiB | time 3.21s | tokens/s 12345
    step 30 | epoch 0 | val_loss 1.1230 | val_acc1 0.7820 | val_mrr 0.8450
    step 30 | epoch 0 | eval ndcg@10 0.4123 | mrr@10 0.3810 | ... | queries 200 | corpus 982   (evaluation: section)

Lines go through the root logger (INFO:root:... with logging.basicConfig, as in the guide);
the same records are appended to training.jsonl / validation.jsonl in the checkpoint folder.
`time` is the mean wall time per optimizer step since the previous log line, `mem` the peak
memory (CUDA: max allocated; CPU: peak resident set of the process). Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch

from embedcore.files import replace_text

log = logging.getLogger()  # the root logger: "INFO:root:step ..." as in the guide's sample output

TRAIN_FILE = "training.jsonl"
VAL_FILE = "validation.jsonl"


def setup_logging(is_main: bool) -> None:
    """INFO lines from rank 0 only, on stdout, in the guide's format."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout)
    else:
        logging.getLogger().setLevel(logging.INFO if is_main else logging.WARNING)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB (CUDA: max allocated; CPU: peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def format_train_line(r: dict) -> str:
    line = (f"step {r['step']} | epoch {r['epoch']} | loss {r['loss']:.4f} | grad_norm {r['grad_norm']:.4f} | "
            f"lr {r['lr']:.2e} | mem {r['mem_gib']:.2f} GiB | time {r['time_s']:.2f}s | "
            f"tokens/s {r['tokens_per_s']:.0f} | padded tokens/s {r['padded_tokens_per_s']:.0f}")
    if "fn_masked" in r:  # the false-negative filter's count over the log interval, all ranks
        line += f" | fn_masked {r['fn_masked']}"
    return line


def format_val_line(r: dict) -> str:
    return (f"step {r['step']} | epoch {r['epoch']} | val_loss {r['val_loss']:.4f} | "
            f"val_acc1 {r['val_acc1']:.4f} | val_mrr {r['val_mrr']:.4f}")


def format_eval_line(r: dict, metrics) -> str:
    """The end-of-training retrieval evaluation (embedcore.evaluate's own line after the position)."""
    from embedcore.evaluate import format_metrics

    return f"step {r['step']} | epoch {r['epoch']} | eval {format_metrics(r, metrics)}"


class RunLogger:
    """Writes log lines and JSONL records (rank 0 only)."""

    def __init__(self, folder: str, is_main: bool):
        self.folder, self.is_main = folder, is_main
        if is_main:
            os.makedirs(folder, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after `step` (written by the run that was interrupted)."""
        if not self.is_main:
            return
        for name in (TRAIN_FILE, VAL_FILE):
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            replace_text(path, "".join(kept))

    def reset(self) -> None:
        """A fresh run: start both JSONL files empty."""
        if self.is_main:
            for name in (TRAIN_FILE, VAL_FILE):
                path = os.path.join(self.folder, name)
                if os.path.exists(path):
                    os.remove(path)

    def _append(self, name: str, record: dict) -> None:
        with open(os.path.join(self.folder, name), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, record: dict) -> None:
        if self.is_main:
            log.info(format_train_line(record))
            self._append(TRAIN_FILE, record)

    def validation(self, record: dict) -> None:
        if self.is_main:
            log.info(format_val_line(record))
            self._append(VAL_FILE, record)

    def evaluation(self, record: dict, metrics) -> None:
        """A retrieval evaluation record (its metrics, num_queries, num_corpus, data, split...)."""
        if self.is_main:
            log.info(format_eval_line(record, metrics))
            self._append(VAL_FILE, record)


class ProgressBar:
    """A tqdm bar over optimizer steps, only when stdout is an interactive terminal (rank 0)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""`python train.py config.yaml [--dotted.key value ...] [--debug]` (also the `embedcore-train` command).

A user error (config key, data file:line, model or checkpoint path, unwritable output, divergence)
is one line on stderr and exit code 2; SIGINT / SIGTERM save a checkpoint and exit 130 / 143
(embedcore.cli.run_cli). --debug shows the traceback.
"""
from __future__ import annotations

import logging
import sys

from embedcore.cli import run_cli

PROG = "train.py"
USAGE = ("usage: python train.py CONFIG.yaml [--section.key value ...] [--debug]   "
         "(e.g. --step_scheduler.max_steps 20)")


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from embedcore.train.config import load_config

    cfg = load_config(argv[0], argv[1:])
    from embedcore.train.loop import train

    result = train(cfg)
    if result.export.get("consolidated"):
        logging.getLogger().info("done: step %d; load the model with SentenceTransformer(%r)", result.step,
                                 result.export["consolidated"])
    else:
        logging.getLogger().info("done: step %d; checkpoint %s", result.step, result.checkpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _run, argv)


if __name__ == "__main__":
    sys.exit(main())

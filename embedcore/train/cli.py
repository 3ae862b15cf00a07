"""`python train.py config.yaml [--dotted.key value ...]` (also the `embedcore-train` command)."""
from __future__ import annotations

import logging
import sys

from embedcore.train.config import ConfigError, load_config

USAGE = "usage: python train.py CONFIG.yaml [--section.key value ...]   (e.g. --step_scheduler.max_steps 20)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from embedcore.train.loop import TrainingDiverged, train

    try:
        result = train(cfg)
    except TrainingDiverged as e:
        logging.getLogger().error("%s", e)
        return 1
    if result.export.get("consolidated"):
        logging.getLogger().info("done: step %d; load the model with SentenceTransformer(%r)", result.step,
                                 result.export["consolidated"])
    else:
        logging.getLogger().info("done: step %d; checkpoint %s", result.step, result.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

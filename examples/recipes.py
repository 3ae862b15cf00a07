"""The training recipes side by side on the bundled docstring data, in one run.

One small fine-tune per recipe with the quickstart's model, data and schedule
(examples/quickstart.yaml): plain InfoNCE, symmetric InfoNCE, Matryoshka, in-batch false-negative
filtering, and score distillation (BM25 as the teacher: examples/make_docstring_data.py's index
scores every positive and negative). Prints one table of the in-group validation MRR and the
full-corpus retrieval metrics of each export, and its nDCG@10 at a 32-dimensional prefix
(re-normalised; the prefix the Matryoshka recipe trains). Not a claim that a recipe wins: what
each does here, on a 2-layer model trained for a few minutes.

    python examples/recipes.py [--epochs N] [--out output/recipes]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

PREFIX_DIM = 32
RECIPES = {  # name -> overrides of examples/quickstart.yaml
    "plain": [],
    "symmetric": ["--loss.symmetric_weight", "1.0"],
    "matryoshka": ["--loss.matryoshka_dims", f"[128, 64, {PREFIX_DIM}]"],
    "false_negative_filter": ["--loss.false_negative_margin", "0.95"],
    "distillation": ["--loss.distill_weight", "1.0", "--loss.distill_temperature", "2.0"],
}
METRICS = ["ndcg@10", "mrr@10", "recall@10"]


def scored_copy(src: str, dst: str) -> str:
    """src with every positive and negative as {"text", "score"}: its BM25 score for the query
    over the file's passages (the index that chose the negatives)."""
    from make_docstring_data import BM25

    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    passages = sorted({r["pos_doc"] for r in rows} | {n for r in rows for n in r["neg_doc"]})
    index, at = BM25(passages), {p: i for i, p in enumerate(passages)}
    with open(dst, "w", encoding="utf-8") as f:
        for r in rows:
            scores = index.scores(r["query"])
            doc = lambda text: {"text": text, "score": round(scores.get(at[text], 0.0), 4)}  # noqa: E731
            f.write(json.dumps({**r, "pos_doc": [doc(r["pos_doc"])], "neg_doc": [doc(n) for n in r["neg_doc"]]}) + "\n")
    return dst


def run(name: str, overrides: list, out: str, epochs: int) -> dict:
    from embedcore.evaluate import evaluate_model
    from embedcore.train.config import load_config
    from embedcore.train.loop import train

    cfg = load_config(os.path.join(HERE, "quickstart.yaml"), overrides + [
        "--checkpoint.checkpoint_dir", os.path.join(out, name), "--step_scheduler.num_epochs", str(epochs)])
    t0 = time.perf_counter()
    result = train(cfg)
    row = {"recipe": name, "val_mrr": result.validations[-1]["val_mrr"], "seconds": time.perf_counter() - t0,
           **{m: result.evaluation[m] for m in METRICS}}
    # Every export at the Matryoshka recipe's smallest prefix: what truncating costs without it.
    prefix = evaluate_model(result.export["consolidated"], cfg.evaluation.data, metrics=["ndcg@10"], dim=PREFIX_DIM)
    row[f"ndcg@10 at {PREFIX_DIM} dims"] = prefix["ndcg@10"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="output/recipes")
    ap.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="a subset of the recipes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    scored = scored_copy(os.path.join(HERE, "data", "stdlib_train.jsonl"), os.path.join(args.out, "train_scored.jsonl"))
    rows = []
    for name in args.only or RECIPES:
        overrides = list(RECIPES[name])
        if name == "distillation":
            overrides += ["--dataloader.dataset.data_dir_list", json.dumps([scored])]
        rows.append(run(name, overrides, args.out, args.epochs))
        print(f"{name}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    keys = ["val_mrr", *METRICS]
    keys += sorted({k for r in rows for k in r} - {"recipe", "seconds", *keys})  # the prefix metric
    print("\n| recipe | " + " | ".join(keys) + " | seconds |")
    print("| --- |" + " ---: |" * (len(keys) + 1))
    for r in rows:
        cells = [f"{r[k]:.4f}" if k in r else "-" for k in keys]
        print(f"| {r['recipe']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

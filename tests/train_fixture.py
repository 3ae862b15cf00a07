"""Tiny training setups for the trainer's tests: a synthetic retrieval dataset (topic words, so
that a few steps can learn something), a tiny Llama built locally, and a config mapping."""
import json
import os
import random

TOPICS = {
    "file": "open read write close path directory stream buffer",
    "math": "sum product square root sine cosine integer float",
    "net": "socket host port connect send receive request url",
    "text": "string split join upper lower strip replace format",
    "time": "date time clock second minute hour zone calendar",
    "list": "append extend insert remove sort reverse index count",
}


def write_dataset(path: str, n: int, seed: int = 0, negatives: int = 3) -> str:
    """n inline-JSONL examples: query and positive share a topic, negatives come from other topics."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    with open(path, "w") as f:
        for i in range(n):
            topic = names[i % len(names)]
            words = TOPICS[topic].split()
            query = " ".join(rng.sample(words, 3)) + f" {i}"
            pos = " ".join(rng.sample(words, 6))
            negs = []
            for _ in range(negatives):
                other = TOPICS[rng.choice([t for t in names if t != topic])].split()
                negs.append(" ".join(rng.sample(other, 6)))
            f.write(json.dumps({"query": query, "pos_doc": pos, "neg_doc": negs}) + "\n")
    return path


def all_texts() -> list:
    return [w for words in TOPICS.values() for w in words.split()] + list(TOPICS.values()) + [str(i) for i in range(100)]


def make_model(folder: str) -> str:
    from embedcore.models.tiny import make_tiny_llama

    if not os.path.isdir(folder):
        make_tiny_llama(folder, all_texts() * 4, vocab_size=300, hidden_size=32, layers=2, heads=4, kv_heads=2)
    return folder


def base_config(model: str, train: str, val: str | None, ckpt: str, **steps) -> dict:
    """A plain-data config for a few fp32 CPU steps."""
    cfg = {
        "seed": 7,
        "train_n_passages": 3,
        "eval_negative_size": 2,
        "temperature": 0.05,
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 2, "ckpt_every_steps": 0,
                           "val_every_steps": 0, "num_epochs": 1, "log_every_steps": 1, **steps},
        "dist_env": {"backend": "gloo"},
        "model": {"pretrained_model_name_or_path": model, "pooling": "avg", "torch_dtype": "float32"},
        "dataloader": {"dataset": {"data_dir_list": [train]},
                       "collate_fn": {"q_max_len": 16, "p_max_len": 16, "query_prefix": "query:",
                                      "passage_prefix": "passage:", "pad_to_multiple_of": 8}},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.01},
        "lr_scheduler": {"lr_warmup_steps": 1, "lr_decay_style": "constant"},
        "checkpoint": {"checkpoint_dir": ckpt, "save_consolidated": False},
    }
    if val is not None:
        cfg["validation_dataloader"] = {
            "dataset": {"data_dir_list": [val], "data_type": "eval"}, "batch_size": 3, "shuffle": False,
            "collate_fn": {"q_max_len": 16, "p_max_len": 16, "query_prefix": "query:", "passage_prefix": "passage:"}}
    return cfg


def write_beir(folder: str, n_queries: int = 12, docs_per_topic: int = 3, seed: int = 2) -> str:
    """A tiny BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv and qrels/dev.tsv): each
    query is relevant to the documents of its topic; dev holds the first half of the queries."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        for t in names:
            for j in range(docs_per_topic):
                f.write(json.dumps({"_id": f"{t}-{j}", "title": t, "text": " ".join(rng.sample(TOPICS[t].split(), 5))}) + "\n")
    qrels = []
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        for i in range(n_queries):
            t = names[i % len(names)]
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.sample(TOPICS[t].split(), 3))}) + "\n")
            qrels += [(f"q{i}", f"{t}-{j}") for j in range(docs_per_topic)]
    for split, rows in (("test", qrels), ("dev", qrels[: len(qrels) // 2])):
        with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t1\n" for q, d in rows)
    return folder

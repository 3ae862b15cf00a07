"""Full-corpus retrieval evaluation: `python -m embedcore.evaluate --model M --data D [--split test]`.

Every query is scored against the whole corpus (exact, in blocks, sharded across ranks under
torchrun, as in mining) and nDCG@10, MRR@10, Recall@10, Recall@100, MAP@100 are computed with
the definitions of sentence-transformers' InformationRetrievalEvaluator (retrieval.metrics).

--data is one of
- a BEIR folder: corpus.jsonl ({"_id", "title", "text"}; a document is "title text", stripped),
  queries.jsonl ({"_id", "text"}), qrels/<split>.tsv (query-id, corpus-id, score; header optional);
- a corpus-ID JSON data file: each row's query against its corpus, its pos_doc ids relevant;
- an inline JSONL data file: the corpus is every distinct pos_doc / neg_doc text of the file,
  each query's positives relevant.
--model is any folder embedcore.retrieval.model loads (ours, sentence-transformers, Hugging Face).
Metrics are printed and written as JSON (--output, default eval_<data>_<split>.json).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from embedcore.data.errors import DataError
from embedcore.retrieval import distributed as D
from embedcore.retrieval.encode import encode_all, encode_texts
from embedcore.retrieval.metrics import DEFAULT_METRICS, _parse, compute_metrics
from embedcore.retrieval.topk import sharded_topk

log = logging.getLogger("embedcore.evaluate")


@dataclass
class RetrievalTask:
    """Queries, a corpus and qrels: one scoring pass (a data set can hold several, one per corpus)."""

    name: str
    query_ids: list
    queries: list
    doc_ids: list
    docs: list
    qrels: dict  # query id -> {doc id: relevance}


# ------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------
def _read_jsonl(path: str, keys: Sequence[str]) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found", "file_not_found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}", "malformed_json") from e
            missing = [k for k in keys if not isinstance(row, dict) or k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing key(s) {missing}", "malformed_json")
            rows.append(row)
    return rows


def read_beir(folder: str, split: str) -> RetrievalTask:
    """A BEIR-layout folder as one task."""
    corpus = _read_jsonl(os.path.join(folder, "corpus.jsonl"), ["_id", "text"])
    if not corpus:
        raise DataError(f"{folder}/corpus.jsonl: the corpus is empty", "empty_corpus")
    queries = _read_jsonl(os.path.join(folder, "queries.jsonl"), ["_id", "text"])
    qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        have = sorted(os.listdir(os.path.join(folder, "qrels"))) if os.path.isdir(os.path.join(folder, "qrels")) else []
        raise DataError(f"{qrels_path}: qrels for split {split!r} not found (have: {have or 'no qrels folder'})",
                        "file_not_found")
    qrels: dict = {}
    with open(qrels_path, encoding="utf-8", newline="") as f:
        for lineno, rec in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not rec or not "".join(rec).strip():
                continue
            if len(rec) < 3:
                raise DataError(f"{qrels_path}:{lineno}: expected query-id, corpus-id, score", "malformed_qrels")
            try:
                rel = float(rec[2])
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DataError(f"{qrels_path}:{lineno}: score {rec[2]!r} is not a number", "malformed_qrels") from None
            qrels.setdefault(str(rec[0]), {})[str(rec[1])] = rel
    qids = [str(q["_id"]) for q in queries]
    known = set(qids)
    dropped = [q for q in qrels if q not in known]
    if dropped:
        log.warning("%s: %d qrels queries are not in queries.jsonl and are ignored (first: %r)", qrels_path,
                    len(dropped), dropped[0])
    qrels = {q: r for q, r in qrels.items() if q in known}
    keep = [i for i, q in enumerate(qids) if any(v > 0 for v in qrels.get(q, {}).values())]
    docs = [((d.get("title") or "") + " " + d["text"]).strip() for d in corpus]
    return RetrievalTask(os.path.basename(os.path.normpath(folder)), [qids[i] for i in keep],
                         [queries[i]["text"] for i in keep], [str(d["_id"]) for d in corpus], docs, qrels)


def read_data_file(path: str) -> list[RetrievalTask]:
    """Our training formats as tasks: corpus-ID JSON (one task per corpus) or inline JSONL."""
    from embedcore.data.formats import load_examples

    examples = load_examples([path])
    tasks: dict = {}
    seen: set = set()  # inline passages already in the corpus (by uid)
    for ex in examples.examples:
        if ex.corpus_id is not None:
            task = tasks.get(ex.corpus_id)
            if task is None:
                corpus = examples.corpus(ex.corpus_id)
                if len(corpus) == 0:
                    raise DataError(f"corpus {ex.corpus_id!r} ({corpus.table}) is empty", "empty_corpus")
                ids = list(corpus.docs)
                task = tasks[ex.corpus_id] = RetrievalTask(ex.corpus_id, [], [], ids, [corpus.docs[i] for i in ids], {})
            prefix = f"{ex.corpus_id}:"
            rel = {p.uid[len(prefix):]: 1.0 for p in ex.positives}
        else:
            task = tasks.get(None)
            if task is None:
                task = tasks[None] = RetrievalTask(os.path.basename(path), [], [], [], [], {})
            for p in list(ex.positives) + list(ex.negatives):
                if p.uid not in seen:
                    seen.add(p.uid)
                    task.doc_ids.append(p.uid)
                    task.docs.append(p.text)
            rel = {p.uid: 1.0 for p in ex.positives}
        qid = ex.qid
        if qid in task.qrels:  # repeated question ids: keep them apart
            qid = f"{qid}#{len(task.query_ids)}"
        task.query_ids.append(qid)
        task.queries.append(ex.query)
        task.qrels[qid] = rel
    return list(tasks.values())


def load_tasks(data: str, split: str) -> list[RetrievalTask]:
    """A BEIR folder or one of our data files -> tasks."""
    if os.path.isdir(data):
        return [read_beir(data, split)]
    if os.path.isfile(data):
        return read_data_file(data)
    raise DataError(f"{data}: evaluation data not found (a BEIR folder or a .json/.jsonl data file)", "file_not_found")


# ------------------------------------------------------------------------------------------
# Scoring.
# ------------------------------------------------------------------------------------------
def rank_task(model, task: RetrievalTask, k: int, *, batch_size: int = 128, max_length: int | None = None,
              corpus_block: int = 16384, progress: bool | None = None) -> dict:
    """{query id: [(doc id, score)] * k} for one task (every rank returns the same)."""
    max_length = max_length or model.max_seq_length or 512
    common = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    local_idx, local_emb = encode_texts(model, task.docs, kind="passage", prefix=model.passage_prefix,
                                        sharded=D.is_distributed(), desc=f"encoding corpus [{task.name}]", **common)
    q_emb = encode_all(model, task.queries, kind="query", prefix=model.query_prefix,
                       desc=f"encoding queries [{task.name}]", **common)
    top = sharded_topk(q_emb, local_emb, local_idx, len(task.docs), min(k, len(task.docs)),
                       query_block=batch_size, corpus_block=corpus_block, progress=progress,
                       desc=f"scoring [{task.name}]")
    rankings = {}
    for qid, scores, idx in zip(task.query_ids, top.scores.tolist(), top.indices.tolist()):
        rankings[qid] = [(task.doc_ids[i], s) for i, s in zip(idx, scores) if i >= 0]
    return rankings


def evaluate_model(model_dir, data: str, split: str = "test", *, metrics: Sequence[str] = DEFAULT_METRICS,
                   batch_size: int = 128, max_length: int | None = None, query_prefix: str | None = None,
                   passage_prefix: str | None = None, dtype: str = "float32", corpus_block: int = 16384,
                   progress: bool | None = None, model=None) -> dict:
    """Full-corpus retrieval metrics of a model folder on `data` (see the module docstring).

    Call it on every rank when a process group is running (the trainer at the end of training);
    every rank returns the same dict: the metrics, num_queries, num_corpus, model, data, split,
    seconds. `model` may be an already loaded RetrievalModel (then model_dir is only recorded).
    """
    from embedcore.retrieval.model import RetrievalModel

    t0 = time.perf_counter()
    for name in metrics:
        _parse(name)
    tasks = load_tasks(os.fspath(data), split)
    if model is None:
        model = RetrievalModel.load(model_dir, dtype=dtype, query_prefix=query_prefix,
                                    passage_prefix=passage_prefix, key="--model")
    k = max(_parse(m)[1] for m in metrics)
    rankings, qrels = {}, {}
    for task in tasks:
        ranked = rank_task(model, task, k, batch_size=batch_size, max_length=max_length,
                           corpus_block=corpus_block, progress=progress)
        prefix = f"{task.name}/" if len(tasks) > 1 else ""
        rankings.update({prefix + q: r for q, r in ranked.items()})
        qrels.update({prefix + q: r for q, r in task.qrels.items()})
    result = compute_metrics(rankings, qrels, metrics)
    result.update(num_corpus=sum(len(t.docs) for t in tasks), model=str(model_dir), data=str(data), split=split,
                  seconds=round(time.perf_counter() - t0, 3))
    return result


def format_metrics(result: dict, metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """One log line: `ndcg@10 0.6123 | mrr@10 ... | queries N | corpus M`."""
    parts = [f"{m} {result[m]:.4f}" for m in metrics]
    return " | ".join(parts + [f"queries {result['num_queries']}", f"corpus {result['num_corpus']}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedcore.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (ours, sentence-transformers or Hugging Face)")
    p.add_argument("--data", required=True, help="BEIR folder, corpus-ID JSON or inline JSONL")
    p.add_argument("--split", default="test", help="BEIR qrels split (qrels/<split>.tsv)")
    p.add_argument("--output", default=None, help="metrics JSON (default eval_<data>_<split>.json)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's max_seq_length, else 512)")
    p.add_argument("--query-prefix", default=None, help="override the model's query prefix ('' for none)")
    p.add_argument("--passage-prefix", default=None, help="override the model's passage prefix ('' for none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated KIND@K list")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    started = D.init_from_env()
    is_main = D.rank() == 0
    try:
        result = evaluate_model(args.model, args.data, args.split, metrics=metrics, batch_size=args.batch_size,
                                max_length=args.max_length, query_prefix=args.query_prefix,
                                passage_prefix=args.passage_prefix, dtype=args.dtype)
        D.barrier()  # no rank tears the group down while gloo still frees another's last collective
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"embedcore.evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        D.shutdown(started)
    if is_main:
        out = args.output or f"eval_{os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]}_{args.split}.json"
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(format_metrics(result, metrics))
        print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

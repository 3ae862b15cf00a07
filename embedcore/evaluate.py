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
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from embedcore.data.errors import DataError
from embedcore.cli import run_cli
from embedcore.errors import ConfigError
from embedcore.files import check_writable, iter_lines, read_jsonl, write_json
from embedcore import distributed as D
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
    dataset: str | None = None  # the corpus id (corpus-ID data): names its prompts / instructions
    instructions: tuple = (None, None)  # that corpus's (query_instruction, passage_instruction)


# ------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------
def _read_jsonl(path: str, keys: Sequence[str]) -> list[dict]:
    rows = []
    for where, row in read_jsonl(path, "BEIR file"):
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}", "malformed_json")
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
    for lineno, line in iter_lines(qrels_path, "qrels file"):
        rec = line.rstrip("\r\n").split("\t")
        if not "".join(rec).strip():
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
    doc_ids = [str(d["_id"]) for d in corpus]
    qrels = _known_qrels(qrels, set(qids), set(doc_ids), qrels_path)
    keep = [i for i, q in enumerate(qids) if any(v > 0 for v in qrels.get(q, {}).values())]
    docs = [((d.get("title") or "") + " " + d["text"]).strip() for d in corpus]
    return RetrievalTask(os.path.basename(os.path.normpath(folder)), [qids[i] for i in keep],
                         [queries[i]["text"] for i in keep], doc_ids, docs, qrels)


def _known_qrels(qrels: dict, query_ids: set, doc_ids: set, where: str) -> dict:
    """qrels restricted to queries and documents that exist. Ids the qrels name but the data lacks are
    warned about (count and examples): they cannot be retrieved, and scoring them as misses would
    report a silent zero. No relevant pair surviving at all is an error, not a score of 0."""
    missing_q = sorted(q for q in qrels if q not in query_ids)
    missing_d = sorted({d for q, rel in qrels.items() if q in query_ids for d in rel if d not in doc_ids})
    if missing_q:
        log.warning("%s: %d qrels queries are not in queries.jsonl and are ignored (e.g. %s)", where,
                    len(missing_q), ", ".join(map(repr, missing_q[:5])))
    if missing_d:
        log.warning("%s: %d qrels documents are not in corpus.jsonl and are ignored (e.g. %s)", where,
                    len(missing_d), ", ".join(map(repr, missing_d[:5])))
    kept = {q: {d: r for d, r in rel.items() if d in doc_ids} for q, rel in qrels.items() if q in query_ids}
    kept = {q: rel for q, rel in kept.items() if rel}
    if not any(r > 0 for rel in kept.values() for r in rel.values()):
        raise DataError(f"{where}: no qrels pair names a query of queries.jsonl and a document of corpus.jsonl "
                        f"with a score > 0 ({len(missing_q)} unknown query ids, {len(missing_d)} unknown document "
                        f"ids): nothing to evaluate", "no_qrels")
    return kept


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
                task = tasks[ex.corpus_id] = RetrievalTask(ex.corpus_id, [], [], ids, [corpus.docs[i] for i in ids], {},
                                                           ex.corpus_id,
                                                           (corpus.query_instruction, corpus.passage_instruction))
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
                   progress: bool | None = None, model=None, use_instructions: bool = False,
                   dim: int | None = None) -> dict:
    """Full-corpus retrieval metrics of a model folder on `data` (see the module docstring).

    Prefixes, per corpus: embedcore.retrieval.model's rule (explicit prefixes, else the model's
    prompts for that corpus, else its own; use_instructions: the corpus metadata's instructions
    applied by the training rule).

    Call it on every rank when a process group is running (the trainer at the end of training);
    every rank returns the same dict: the metrics, num_queries, num_corpus, model, data, split,
    seconds (and dim when given). `model` may be an already loaded RetrievalModel (then model_dir is
    only recorded). dim: evaluate the first `dim` dimensions of the embeddings, re-normalised (a
    Matryoshka prefix; the export's embedcore_biencoder.json lists the trained ones).
    """
    from embedcore.retrieval.model import RetrievalModel

    t0 = time.perf_counter()
    for name in metrics:
        _parse(name)
    tasks = load_tasks(os.fspath(data), split)
    if model is None:
        model = RetrievalModel.load(model_dir, dtype=dtype, query_prefix=query_prefix,
                                    passage_prefix=passage_prefix, key="--model")
    model.set_dim(dim, "--dim")
    k = max(_parse(m)[1] for m in metrics)
    rankings, qrels = {}, {}
    for task in tasks:
        with model.using_prefixes(*model.prefixes_for(task.dataset, task.instructions, use_instructions)):
            ranked = rank_task(model, task, k, batch_size=batch_size, max_length=max_length,
                               corpus_block=corpus_block, progress=progress)
        prefix = f"{task.name}/" if len(tasks) > 1 else ""
        rankings.update({prefix + q: r for q, r in ranked.items()})
        qrels.update({prefix + q: r for q, r in task.qrels.items()})
    result = compute_metrics(rankings, qrels, metrics)
    result.update(num_corpus=sum(len(t.docs) for t in tasks), model=str(model_dir), data=str(data), split=split,
                  seconds=round(time.perf_counter() - t0, 3), **({"dim": dim} if dim is not None else {}))
    return result


def format_metrics(result: dict, metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """One log line: `ndcg@10 0.6123 | mrr@10 ... | queries N | corpus M`."""
    parts = [f"{m} {result[m]:.4f}" for m in metrics]
    return " | ".join(parts + [f"queries {result['num_queries']}", f"corpus {result['num_corpus']}"])


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m embedcore.evaluate", description=__doc__.split("\n\n")[0],
                                epilog="--debug: show the traceback of an error")
    p.add_argument("--model", required=True, help="model folder (ours, sentence-transformers or Hugging Face)")
    p.add_argument("--data", required=True, help="BEIR folder, corpus-ID JSON or inline JSONL")
    p.add_argument("--split", default="test", help="BEIR qrels split (qrels/<split>.tsv)")
    p.add_argument("--output", default=None, help="metrics JSON (default eval_<data>_<split>.json)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's max_seq_length, else 512)")
    p.add_argument("--query-prefix", default=None, help="override the model's query prefix ('' for none)")
    p.add_argument("--passage-prefix", default=None, help="override the model's passage prefix ('' for none)")
    p.add_argument("--use-instructions", action="store_true",
                   help="apply each corpus's query/passage instruction (merlin_metadata.json) as in training")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated KIND@K list")
    p.add_argument("--dim", type=int, default=None,
                   help="evaluate a prefix of the embedding (a Matryoshka dimension), re-normalised")
    args = p.parse_args(argv)
    for flag in ("batch_size", "max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not args.metrics:
        raise ConfigError("--metrics: at least one KIND@K metric is required")
    for name in args.metrics:
        try:
            _parse(name)
        except ValueError as e:
            raise ConfigError(f"--metrics: {e}") from None
    if args.output is None:
        args.output = f"eval_{os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]}_{args.split}.json"
    return args


def _run(argv: list[str]) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    info = D.init_distributed(timeout_minutes=30)  # a rank may encode its share for long between collectives
    try:
        if info.is_main:
            check_writable(args.output)  # before the encoding, not after it
        result = evaluate_model(args.model, args.data, args.split, metrics=args.metrics, batch_size=args.batch_size,
                                max_length=args.max_length, query_prefix=args.query_prefix,
                                passage_prefix=args.passage_prefix, dtype=args.dtype,
                                use_instructions=args.use_instructions, dim=args.dim)
        if info.is_main:
            write_json(args.output, result)
            print(format_metrics(result, args.metrics))
            print(f"written {args.output}", file=sys.stderr)
        D.barrier(info)  # no rank tears the group down while gloo still frees another's last collective
    finally:
        D.destroy_distributed(info)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a user error is one line on stderr and exit code 2 (embedcore.cli)."""
    return run_cli("embedcore.evaluate", _run, argv)


if __name__ == "__main__":
    sys.exit(main())

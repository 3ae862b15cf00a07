"""Hard-negative mining: `python -m embedcore.mine [config.yaml] --mining.KEY VALUE ...`.

    torchrun --nproc-per-node=8 -m embedcore.mine examples/mining.yaml \
        --mining.model_name_or_path /path/to/model \
        --mining.train_qa_file_path /path/to/input.json \
        --mining.train_file_output_path /path/to/output_with_negatives.json

Input: corpus-ID JSON (its corpora are mined), or inline JSONL plus `mining.corpus_path` (each
positive text must be a document of that corpus). Output: corpus-ID JSON, the input's rows (and
any extra keys) with `pos_doc` / `neg_doc` rebuilt as lists of {"id", "score"}, plus
{"mining": {"args": {...}, "summary": {...}}}; it trains directly with train.py.
Every rank computes; rank 0 writes. Bad input stops with one line saying what and where.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

from embedcore import distributed as D
from embedcore.cli import run_cli
from embedcore.data.errors import DataError
from embedcore.errors import ConfigError, PathNotFound
from embedcore.files import check_writable, read_json, write_json
from embedcore.retrieval.hard_negatives import MiningParams, mine_corpus

log = logging.getLogger("embedcore.mine")


@dataclass
class MiningConfig(MiningParams):
    """The `mining:` section: the knobs of the pass (MiningParams, defined and checked there) plus
    the model, the files and the prefixes. Checked when built: the required paths here, the rest
    by MiningParams."""

    model_name_or_path: str = ""
    """Model folder (ours, a Hugging Face folder or a sentence-transformers folder) to embed with."""
    train_qa_file_path: str = ""
    """Input: corpus-ID JSON, or inline JSONL (then corpus_path names the corpus to mine)."""
    train_file_output_path: str = ""
    """Output corpus-ID JSON."""
    corpus_path: Optional[str] = None
    """For inline JSONL input: the corpus (directory with merlin_metadata.json, or a .parquet/.jsonl
    table with id and text) that holds the positives and is mined for negatives."""
    query_prefix: Optional[str] = None
    """Text before each query, joined with one space as in training (None: the model's own; "": none)."""
    passage_prefix: Optional[str] = None
    """Text before each passage, joined with one space (None: the model's own; "": none)."""
    use_instructions: bool = False
    """Apply each corpus's query_instruction / passage_instruction (merlin_metadata.json) by the
    training rule (embedcore.data.instructions): override the prefix, or fill its {task}. A model
    exported with per-corpus prompts uses them for their corpus either way (retrieval.model)."""
    pooling: Optional[Literal["avg", "weighted_avg", "cls", "last"]] = None
    """Override the model's pooling (None: the model folder's; avg for a bare HF folder)."""
    l2_normalize: Optional[bool] = None
    """Override the model's normalisation (None: the model folder's)."""
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in (scores are accumulated in fp32)."""

    def __post_init__(self):
        for name in ("model_name_or_path", "train_qa_file_path", "train_file_output_path"):
            if not getattr(self, name):
                raise ConfigError(f"mining.{name} is required")
        super().__post_init__()


def load_mining_config(path: Optional[str], overrides: list[str]) -> MiningConfig:
    """YAML file (a `mining:` section, optional) + `--mining.KEY VALUE` overrides -> MiningConfig,
    through the trainer's loader (errors name the file or the dotted key); checked when built
    (MiningConfig.__post_init__)."""
    from embedcore.train.config import load_yaml_with_overrides

    return load_yaml_with_overrides(path, overrides, MiningConfig, section="mining")


# ------------------------------------------------------------------------------------------
# Input: one "job" per corpus: its doc ids and texts, and the rows (queries) that use it.
# ------------------------------------------------------------------------------------------
@dataclass
class _Job:
    corpus_id: str
    doc_ids: list
    texts: list
    rows: list  # indices into the output rows
    queries: list
    positives: list  # per query: corpus indices
    index: dict  # doc id -> corpus index
    instructions: tuple = (None, None)  # the corpus's (query_instruction, passage_instruction)


def read_input(cfg: MiningConfig):
    """(output document without rows' mining results, rows, jobs), checking everything on the way."""
    from embedcore.data.formats import load_corpus, load_examples

    path = cfg.train_qa_file_path
    examples = load_examples([path])  # raises DataError naming file and line / data[i]
    corpus_id_input = examples.examples[0].corpus_id is not None
    if corpus_id_input:
        doc = read_json(path, "data file")  # already checked by load_examples
        rows = [dict(r) for r in doc["data"]]
        corpora = examples.corpora
        here = os.path.dirname(os.path.abspath(path))
        doc["corpus"] = [dict(c, path=os.path.realpath(os.path.join(here, c["path"]))) for c in doc["corpus"]]
        positive_ids = []
        for ex in examples.examples:
            prefix = f"{ex.corpus_id}:"
            positive_ids.append([p.uid[len(prefix):] for p in ex.positives])
    else:
        if not cfg.corpus_path:
            raise DataError(f"{path}: inline JSONL input needs a corpus to mine: set mining.corpus_path "
                            f"(a directory with merlin_metadata.json, or a .parquet/.jsonl table)", "missing_corpus")
        try:
            corpus = load_corpus(cfg.corpus_path)
        except DataError as e:
            raise DataError(f"mining.corpus_path: {e}", e.reason) from e
        corpora = {corpus.corpus_id: corpus}
        by_text = {}
        for doc_id, text in corpus.docs.items():
            by_text.setdefault(text, doc_id)
        doc = {"corpus": [{"path": corpus.path}]}
        rows, positive_ids = [], []
        for ex in examples.examples:
            ids = []
            for k, p in enumerate(ex.positives):
                if p.text not in by_text:
                    raise DataError(f"{ex.source}: pos_doc[{k}] is not a document of corpus {corpus.corpus_id!r} "
                                    f"({corpus.table}): {p.text!r:.80}", "unknown_doc_id")
                ids.append(by_text[p.text])
            positive_ids.append(ids)
            rows.append({"question_id": ex.qid, "question": ex.query, "corpus_id": corpus.corpus_id})
        for ex in examples.examples:
            ex.corpus_id = corpus.corpus_id
    for cid, corpus in corpora.items():
        if len(corpus) == 0:
            raise DataError(f"corpus {cid!r} ({corpus.table}) is empty: nothing to mine", "empty_corpus")
    jobs = {}
    for r, (ex, ids) in enumerate(zip(examples.examples, positive_ids)):
        job = jobs.get(ex.corpus_id)
        if job is None:
            corpus = corpora[ex.corpus_id]
            doc_ids = list(corpus.docs)
            job = jobs[ex.corpus_id] = _Job(ex.corpus_id, doc_ids, [corpus.docs[d] for d in doc_ids], [], [], [],
                                            {d: i for i, d in enumerate(doc_ids)},
                                            (corpus.query_instruction, corpus.passage_instruction))
        job.rows.append(r)
        job.queries.append(ex.query)
        job.positives.append([job.index[d] for d in ids])
    return doc, rows, list(jobs.values())


# ------------------------------------------------------------------------------------------
# Run, summarise, write.
# ------------------------------------------------------------------------------------------
def run_mining(cfg: MiningConfig) -> dict:
    """Mine as configured; returns the output document (written by rank 0)."""
    from embedcore.retrieval.model import RetrievalModel

    t0 = time.perf_counter()
    doc, rows, jobs = read_input(cfg)
    model = RetrievalModel.load(cfg.model_name_or_path, dtype=cfg.torch_dtype, pooling=cfg.pooling,
                                l2_normalize=cfg.l2_normalize, query_prefix=cfg.query_prefix,
                                passage_prefix=cfg.passage_prefix, key="mining.model_name_or_path")
    per_corpus = {}  # corpus id -> (query prefix, passage prefix) where they are not the model's defaults
    for job in jobs:
        prefixes = model.prefixes_for(job.corpus_id, job.instructions, cfg.use_instructions)
        if prefixes != (model.query_prefix, model.passage_prefix):
            per_corpus[job.corpus_id] = list(prefixes)
        with model.using_prefixes(*prefixes):
            mined = mine_corpus(model, job.queries, job.positives, job.texts, cfg, desc=job.corpus_id)
        for r, pos_rows, pos_scores, negs in zip(job.rows, job.positives, mined.positive_scores, mined.negatives):
            rows[r]["corpus_id"] = job.corpus_id
            rows[r]["pos_doc"] = [{"id": job.doc_ids[i], "score": s} for i, s in zip(pos_rows, pos_scores)]
            rows[r]["neg_doc"] = [{"id": job.doc_ids[i], "score": s} for i, s in negs]
    args = dataclasses.asdict(cfg)
    args.update(resolved_query_prefix=model.query_prefix, resolved_passage_prefix=model.passage_prefix,
                resolved_pooling=model.pooling, resolved_l2_normalize=model.l2_normalize, world_size=D.world_size())
    if per_corpus:
        args["resolved_corpus_prefixes"] = per_corpus
    summary = summarize(rows, cfg.hard_negatives_to_mine)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    doc["data"] = rows
    doc["mining"] = {"args": args, "summary": summary}
    if D.is_main():
        write_json(cfg.train_file_output_path, doc)
        print(format_summary(summary, cfg.train_file_output_path), file=sys.stderr)
    return doc


def summarize(rows: list, asked: int) -> dict:
    """Score statistics and the queries that got fewer negatives than asked."""
    pos = [d["score"] for r in rows for d in r["pos_doc"]]
    neg = [d["score"] for r in rows for d in r["neg_doc"]]
    short = [(str(r.get("question_id", i)), len(r["neg_doc"])) for i, r in enumerate(rows) if len(r["neg_doc"]) < asked]

    def stats(xs):
        if not xs:
            return None
        return {"count": len(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}

    return {
        "queries": len(rows),
        "negatives_asked": asked,
        "positive_scores": stats(pos),
        "negative_scores": stats(neg),
        "queries_with_fewer_negatives": len(short),
        "queries_with_no_negative": sum(1 for _, n in short if n == 0),
        "fewer_negatives_examples": [{"question_id": q, "negatives": n} for q, n in short[:20]],
    }


def format_summary(s: dict, out: str) -> str:
    def fmt(st):
        return "none" if st is None else f"mean {st['mean']:.4f} min {st['min']:.4f} max {st['max']:.4f} (n={st['count']})"

    lines = [f"mined {s['queries']} queries in {s['seconds']} s -> {out}",
             f"  positive scores: {fmt(s['positive_scores'])}",
             f"  negative scores: {fmt(s['negative_scores'])}"]
    if s["queries_with_fewer_negatives"]:
        ex = ", ".join(f"{e['question_id']} ({e['negatives']})" for e in s["fewer_negatives_examples"][:5])
        lines.append(f"  {s['queries_with_fewer_negatives']} queries got fewer than {s['negatives_asked']} negatives "
                     f"({s['queries_with_no_negative']} got none; too few candidates under the margin): {ex}")
    else:
        lines.append(f"  every query got {s['negatives_asked']} negatives")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """[config.yaml | --config config.yaml] followed by --mining.KEY VALUE pairs."""
    config = None
    rest = list(argv)
    if rest and not rest[0].startswith("--"):
        config = rest.pop(0)
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise ConfigError("--config: needs a path")
        config = rest[i + 1]
        del rest[i:i + 2]
    return config, rest


def _check_model_folder(path: str) -> None:
    from embedcore.models.backbone import resolve_model_folder

    try:
        resolve_model_folder(path)
    except PathNotFound as e:
        raise PathNotFound(f"mining.model_name_or_path: {e}") from e


def _run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        for f in dataclasses.fields(MiningConfig):
            print(f"  --mining.{f.name} (default {f.default!r})")
        return 0
    config, overrides = parse_args(argv)
    cfg = load_mining_config(config, overrides)
    info = D.init_distributed(timeout_minutes=30)  # a rank may encode its share for long between collectives
    try:
        _check_model_folder(cfg.model_name_or_path)  # before the data is read, not after it
        if info.is_main:
            check_writable(cfg.train_file_output_path)  # before the encoding, not after it
        run_mining(cfg)
        D.barrier(info)  # no rank tears the group down while gloo still frees another's last collective
    finally:
        D.destroy_distributed(info)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; a user error is one line on stderr and exit code 2 (embedcore.cli)."""
    return run_cli("embedcore.mine", _run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Corpora for corpus-ID data: a directory with ``merlin_metadata.json`` and a table of documents.

Layout (as the reference's NeMo-retriever / Merlin format)::

    DIR/merlin_metadata.json   {"class": "TextQADataset", "corpus_id": NAME,
                                optional "query_instruction", "passage_instruction", ...}
    DIR/train.parquet          columns "id" and "text" (read with pyarrow)
      or DIR/train.jsonl       one {"id": ..., "text": ...} object per line

If neither ``train.parquet`` nor ``train.jsonl`` exists, the directory's single ``*.parquet``
or single ``*.jsonl`` file is used; anything else is an error naming what was found. Document
ids are kept as strings (an integer id 7 in parquet and a reference ``"7"`` or ``7`` in the
data file name the same document).
"""
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from embedcore.data.errors import DataError
from embedcore.files import read_json, read_jsonl

__all__ = ["Corpus", "load_corpus", "METADATA_FILE"]

METADATA_FILE = "merlin_metadata.json"
_TABLE_NAMES = ("train.parquet", "train.jsonl")


@dataclass(eq=False)
class Corpus(Mapping):
    """A read-only mapping doc_id (str) -> text, plus where it came from.

    Attributes:
        corpus_id: the name data files use to refer to this corpus.
        path: the resolved directory (or file) it was read from.
        table: the table file actually read.
        query_instruction / passage_instruction: optional instructions from the metadata
            (kept for callers that want them; the data loaders do not prepend them).
        metadata: the whole merlin_metadata.json (empty for a bare table file without one).
    """

    corpus_id: str
    path: str
    table: str
    docs: dict = field(repr=False)
    query_instruction: str | None = None
    passage_instruction: str | None = None
    metadata: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, doc_id):
        return self.docs[str(doc_id)]

    def __iter__(self):
        return iter(self.docs)

    def __len__(self):
        return len(self.docs)

    def __contains__(self, doc_id):
        return str(doc_id) in self.docs


def _read_metadata(directory: str) -> dict:
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise DataError(f"{directory}: corpus directory has no {METADATA_FILE} "
                        f'(expected {{"class": "TextQADataset", "corpus_id": NAME}})', "missing_metadata")
    try:
        meta = read_json(meta_path, METADATA_FILE)
    except DataError as e:
        raise DataError(str(e), "missing_metadata") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}", "missing_metadata")
    if meta.get("class", "TextQADataset") != "TextQADataset":
        raise DataError(f"{meta_path}: key 'class' is {meta['class']!r}; only 'TextQADataset' is supported",
                        "missing_metadata")
    cid = meta.get("corpus_id")
    if not isinstance(cid, str) or not cid:
        raise DataError(f"{meta_path}: key 'corpus_id' missing or not a non-empty string", "missing_metadata")
    return meta


def _find_table(directory: str) -> str:
    for name in _TABLE_NAMES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    found = sorted(n for n in os.listdir(directory) if n.endswith((".parquet", ".jsonl")))
    if len(found) == 1:
        return os.path.join(directory, found[0])
    raise DataError(f"{directory}: expected one corpus table (train.parquet or train.jsonl, columns id and text); "
                    f"found {found or 'none'}", "missing_corpus_table")


def _read_parquet(path: str) -> dict:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file; all mean the same here
        raise DataError(f"{path}: cannot read parquet: {e}", "bad_corpus_table") from e
    missing = [c for c in ("id", "text") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: corpus table lacks column(s) {missing}; has {table.column_names}", "bad_corpus_table")
    docs = {}
    for row, (doc_id, text) in enumerate(zip(table.column("id").to_pylist(), table.column("text").to_pylist())):
        _add_doc(docs, doc_id, text, f"{path}: row {row}")
    return docs


def _read_jsonl(path: str) -> dict:
    docs = {}
    for where, obj in read_jsonl(path, "corpus table", "bad_corpus_table"):
        if not isinstance(obj, dict) or "id" not in obj or "text" not in obj:
            raise DataError(f"{where}: expected an object with keys 'id' and 'text'", "bad_corpus_table")
        _add_doc(docs, obj["id"], obj["text"], where)
    return docs


def _add_doc(docs: dict, doc_id, text, where: str) -> None:
    if doc_id is None or isinstance(doc_id, (dict, list, float)):
        raise DataError(f"{where}: document id must be a string or an integer, got {doc_id!r}", "bad_corpus_table")
    if not isinstance(text, str):
        raise DataError(f"{where}: document {doc_id!r} has no text (got {text!r})", "bad_corpus_table")
    key = str(doc_id)
    if key in docs and docs[key] != text:
        raise DataError(f"{where}: document id {key!r} appears twice with different text", "bad_corpus_table")
    docs[key] = text


def load_corpus(dir_or_file: str) -> Corpus:
    """Read a corpus: a directory with merlin_metadata.json + table, or a bare table file.

    A bare ``.parquet``/``.jsonl`` file takes its corpus_id from a merlin_metadata.json beside
    it when there is one, else from the file name without extension. Raises DataError naming
    the path for a missing directory, missing metadata, missing table, missing columns,
    duplicate ids with different texts or a malformed line.
    """
    path = os.path.realpath(dir_or_file)
    if os.path.isdir(path):
        meta = _read_metadata(path)
        table = _find_table(path)
    elif os.path.isfile(path):
        table = path
        parent = os.path.dirname(path)
        if os.path.isfile(os.path.join(parent, METADATA_FILE)):
            meta = _read_metadata(parent)
        else:
            meta = {"corpus_id": os.path.splitext(os.path.basename(path))[0]}
    else:
        raise DataError(f"{dir_or_file}: corpus path not found", "file_not_found")
    if table.endswith(".parquet"):
        docs = _read_parquet(table)
    elif table.endswith(".jsonl"):
        docs = _read_jsonl(table)
    else:
        raise DataError(f"{table}: unknown corpus table format (expected .parquet or .jsonl)", "unknown_format")
    return Corpus(corpus_id=meta["corpus_id"], path=path, table=table, docs=docs,
                  query_instruction=meta.get("query_instruction"),
                  passage_instruction=meta.get("passage_instruction"), metadata=meta)

"""Readers for the two training-data formats of the reference recipe (see COMPAT.md, Data).

**Inline JSONL** (``.jsonl``, or a ``.json`` file holding JSON lines): one example per line,
``query`` or ``question`` (string); ``pos_doc`` and ``neg_doc`` each a string, ``{"text": ...}``,
or a list of those; optional ``question_id`` / ``id``. ``neg_doc`` may be absent.

**Corpus-ID JSON** (``.json``, one document): ``{"corpus": [{"path": DIR}, ...], "data": [{
"question_id", "question", "corpus_id", "pos_doc": [{"id": ...} or bare id, ...], "neg_doc": [...]}]}``.
``DIR`` resolves against the JSON file's folder and is read by :func:`load_corpus`; an entry's
``corpus_id`` must be one of the corpora the same file lists.

A ``{"text": ...}`` or ``{"id": ...}`` entry may carry a ``"score"`` (a finite number: a teacher's
score, as the mining tool writes for negatives), kept on the Passage for score distillation
(``loss.distill_weight``; the trainer then requires one on every positive and negative).

Errors. Every problem raises :class:`DataError` naming the file and line (JSONL) or the key
(``data[12]`` in corpus-ID JSON). With ``skip_bad=True`` a bad *example* (malformed line,
missing query, empty or malformed positive, malformed negative, unknown corpus id, unknown doc
id) is skipped and counted in ``ExampleSet.skipped``. Problems with a whole file or corpus
(file not found, unknown format, unparseable JSON document, missing ``corpus`` list, missing
merlin_metadata.json, a corpus_id defined by two different paths) always raise: skipping them
would quietly drop a whole source. A load that yields no example at all raises too.

A negative whose uid equals one of the example's positives is dropped (it would be a false
negative); the number dropped is in ``ExampleSet.dropped_negatives`` and in ``summary()``.
"""
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from embedcore.data.corpus import Corpus, load_corpus
from embedcore.data.errors import DataError, SkipCounter
from embedcore.data.ids import corpus_uid, text_uid
from embedcore.files import iter_records, parse_json_line, read_text

__all__ = ["DataError", "Passage", "Example", "ExampleSet", "load_examples", "load_corpus", "Corpus"]


@dataclass(frozen=True)
class Passage:
    """A passage's text and its stable uid (see embedcore.data.ids); ``doc_id`` is the corpus
    document id for corpus-ID data (None for inline text), so callers need not parse the uid."""

    text: str
    uid: str
    doc_id: str | None = None
    score: float | None = None  # a teacher's score for the query, when the data gives one


@dataclass
class Example:
    """One training example: a query with its positives and (possibly no) negatives.

    ``source`` is where it was read (``file:line`` or ``file: data[i]``), for error messages;
    ``corpus_id`` is set for corpus-ID data, None for inline data; ``file_index`` is the
    position of its file in the list given to load_examples (the dataset it belongs to when
    several files are mixed, see embedcore.data.mixing).
    """

    query: str
    qid: str
    positives: list
    negatives: list
    source: str
    corpus_id: str | None = None
    file_index: int = 0


@dataclass(eq=False)
class ExampleSet(Sequence):
    """The examples read from one or several files, plus the corpora they reference.

    Attributes:
        examples: list of Example, in file order (files in the order given).
        corpora: corpus_id -> Corpus for every corpus any corpus-ID file listed.
        skipped: reason -> count of examples skipped (only with skip_bad=True).
        dropped_negatives: negatives removed because they equal one of the example's positives.
        files: the data files read, as given.
        skip_bad: whether bad examples were skipped (RetrievalDataset skips examples without
            negatives under the same rule).
    """

    examples: list
    corpora: dict
    skipped: dict
    dropped_negatives: int
    files: list
    skip_bad: bool
    skip_messages: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, i):
        return self.examples[i]

    def __len__(self):
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def corpus(self, corpus_id: str) -> Corpus:
        """The corpus named ``corpus_id`` (a Mapping doc_id -> text)."""
        try:
            return self.corpora[corpus_id]
        except KeyError:
            raise DataError(f"unknown corpus id {corpus_id!r}; loaded: {sorted(self.corpora)}",
                            "unknown_corpus_id") from None

    def summary(self) -> str:
        """One line for the log: counts of examples, files, corpora, skips and dropped negatives."""
        line = (f"{len(self.examples)} examples from {len(self.files)} file{'s' if len(self.files) != 1 else ''}"
                + (f", {len(self.corpora)} corpora" if self.corpora else ""))
        if self.skipped:
            total = sum(self.skipped.values())
            line += f"; skipped {total} bad (" + ", ".join(f"{k}: {v}" for k, v in self.skipped.items()) + ")"
        if self.dropped_negatives:
            line += f"; dropped {self.dropped_negatives} negatives equal to a positive"
        return line


class _Loader:
    """Holds state shared across files: corpora by id and by path, skip counts."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skips = SkipCounter()
        self.corpora = {}  # corpus_id -> Corpus
        self.by_path = {}  # realpath -> Corpus
        self.examples = []
        self.dropped_negatives = 0
        self.file_index = 0  # the data_dir_list position of the file being read

    # -- one example, either format -------------------------------------------------------
    def add(self, build, where: str) -> None:
        """Run ``build()`` (which returns an Example or raises DataError); skip or raise."""
        try:
            ex = build()
        except DataError as e:
            if not self.skip_bad:
                raise
            self.skips.add(e)
            return
        pos_uids = {p.uid for p in ex.positives}
        kept = [n for n in ex.negatives if n.uid not in pos_uids]
        self.dropped_negatives += len(ex.negatives) - len(kept)
        ex.negatives = kept
        ex.file_index = self.file_index
        self.examples.append(ex)

    # -- files -----------------------------------------------------------------------------
    def load_file(self, path: str) -> None:
        if not os.path.exists(path):
            raise DataError(f"{path}: data file not found", "file_not_found")
        if os.path.isdir(path):
            raise DataError(f"{path}: is a directory; data_dir_list takes .json / .jsonl files", "unknown_format")
        if path.endswith(".jsonl"):
            self.load_jsonl(path)
        elif path.endswith(".json"):
            self.load_json(path)
        else:
            raise DataError(f"{path}: unknown data file format (expected .jsonl inline examples or .json "
                            f"corpus-ID data)", "unknown_format")

    def load_json(self, path: str) -> None:
        text = read_text(path, "data file")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if _looks_like_jsonl(text):
                self.load_jsonl(path)
                return
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}", "malformed_json") from e
        if isinstance(doc, dict) and ("data" in doc or "corpus" in doc):
            self.load_corpus_id(path, doc)
        elif isinstance(doc, dict):  # a one-line inline file named .json
            self.load_jsonl(path)
        else:
            raise DataError(f"{path}: expected a corpus-ID JSON object with keys 'corpus' and 'data' "
                            f"(or JSON lines), got a JSON {type(doc).__name__}", "unknown_format")

    def load_jsonl(self, path: str) -> None:
        base = os.path.basename(path)
        # parsed inside add(), so that skip_bad skips a malformed line; a non-UTF-8 line stops the load, naming it
        for lineno, where, line in iter_records(path, "data file"):
            self.add(lambda: _inline_example(line, where, f"{base}:{lineno}"), where)

    def load_corpus_id(self, path: str, doc: dict) -> None:
        corpora = self.corpora_of(path, doc)
        data = doc.get("data")
        if not isinstance(data, list):
            raise DataError(f"{path}: key 'data' missing or not a list", "unknown_format")
        base = os.path.basename(path)
        for i, row in enumerate(data):
            where = f"{path}: data[{i}]"
            if isinstance(row, dict) and row.get("question_id") is not None:
                where += f" (question_id {row['question_id']!r})"
            self.add(lambda: _corpus_example(row, where, f"{base}:data[{i}]", corpora), where)

    def corpora_of(self, path: str, doc: dict) -> dict:
        """Load (once) the corpora a corpus-ID file lists; corpus_id -> Corpus for this file."""
        entries = doc.get("corpus")
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{path}: key 'corpus' missing or not a non-empty list of {{\"path\": DIR}}",
                            "unknown_format")
        here = os.path.dirname(os.path.abspath(path))
        mine = {}
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise DataError(f"{path}: corpus[{j}] must be an object with a string 'path'", "unknown_format")
            cpath = os.path.realpath(os.path.join(here, entry["path"]))
            if not os.path.exists(cpath):
                raise DataError(f"{path}: corpus[{j}]: corpus directory {entry['path']!r} not found "
                                f"(resolved to {cpath})", "file_not_found")
            corpus = self.by_path.get(cpath)
            if corpus is None:
                try:
                    corpus = load_corpus(cpath)
                except DataError as e:
                    raise DataError(f"{path}: corpus[{j}]: {e}", e.reason) from e
                self.by_path[cpath] = corpus
            prev = self.corpora.get(corpus.corpus_id)
            if prev is not None and prev.path != corpus.path:
                raise DataError(f"{path}: corpus[{j}]: corpus_id {corpus.corpus_id!r} is defined by two different "
                                f"paths: {prev.path} and {corpus.path}", "corpus_conflict")
            self.corpora[corpus.corpus_id] = corpus
            mine[corpus.corpus_id] = corpus
        return mine


def _looks_like_jsonl(text: str) -> bool:
    """A .json file whose first non-empty line is a whole JSON object is read as JSON lines."""
    for line in text.splitlines():
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                return False
    return False


def _query_of(row: dict, where: str) -> str:
    for key in ("query", "question"):
        q = row.get(key)
        if isinstance(q, str) and q.strip():
            return q
    raise DataError(f"{where}: missing query (expected a non-empty string under 'query' or 'question')",
                    "missing_query")


def _qid_of(row: dict, default: str) -> str:
    for key in ("question_id", "id"):
        if row.get(key) is not None:
            return str(row[key])
    return default


def _score_of(item, where: str, key: str, k: int) -> float | None:
    """The optional "score" of a pos_doc / neg_doc entry: a finite number, or None."""
    if not isinstance(item, dict) or item.get("score") is None:
        return None
    score = item["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: {key}[{k}].score must be a finite number, got {score!r:.40}",
                        "empty_positive" if key == "pos_doc" else "bad_negative")
    return float(score)


def _inline_texts(value, where: str, key: str) -> list:
    """pos_doc / neg_doc of an inline example -> list of (non-empty string, score or None)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    texts = []
    for k, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            hint = " (a doc given by id needs corpus-ID JSON)" if isinstance(item, dict) and "id" in item else ""
            raise DataError(f"{where}: {key}[{k}] is not a non-empty string or {{\"text\": ...}}: {item!r:.80}{hint}",
                            "empty_positive" if key == "pos_doc" else "bad_negative")
        texts.append((text, _score_of(item, where, key, k)))
    return texts


def _inline_example(line: str, where: str, default_qid: str) -> Example:
    row = parse_json_line(line, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "malformed_json")
    query = _query_of(row, where)
    pos = _inline_texts(row.get("pos_doc"), where, "pos_doc")
    if not pos:
        raise DataError(f"{where}: empty positive (key 'pos_doc' missing or empty)", "empty_positive")
    neg = _inline_texts(row.get("neg_doc"), where, "neg_doc")
    return Example(query=query, qid=_qid_of(row, default_qid),
                   positives=[Passage(t, text_uid(t), score=sc) for t, sc in pos],
                   negatives=[Passage(t, text_uid(t), score=sc) for t, sc in neg], source=where)


def _doc_refs(value, where: str, key: str) -> list:
    """pos_doc / neg_doc of a corpus-ID example -> list of (doc id (str), score or None)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    ids = []
    for k, item in enumerate(items):
        doc_id = item.get("id") if isinstance(item, dict) else item
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) == "":
            raise DataError(f"{where}: {key}[{k}] is not a doc id or {{\"id\": ...}}: {item!r:.80}",
                            "empty_positive" if key == "pos_doc" else "bad_negative")
        ids.append((str(doc_id), _score_of(item, where, key, k)))
    return ids


def _corpus_example(row, where: str, default_qid: str, corpora: dict) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "malformed_json")
    query = _query_of(row, where)
    cid = row.get("corpus_id")
    if not isinstance(cid, str) or cid not in corpora:
        raise DataError(f"{where}: unknown corpus id {cid!r}; this file lists {sorted(corpora)}",
                        "unknown_corpus_id")
    corpus = corpora[cid]
    pos_ids = _doc_refs(row.get("pos_doc"), where, "pos_doc")
    if not pos_ids:
        raise DataError(f"{where}: empty positive (key 'pos_doc' missing or empty)", "empty_positive")
    neg_ids = _doc_refs(row.get("neg_doc"), where, "neg_doc")

    def passages(ids, key):
        out = []
        for doc_id, score in ids:
            if doc_id not in corpus.docs:
                raise DataError(f"{where}: {key} id {doc_id!r} is not in corpus {cid!r} ({corpus.table})",
                                "unknown_doc_id")
            out.append(Passage(corpus.docs[doc_id], corpus_uid(cid, doc_id), doc_id, score))
        return out

    return Example(query=query, qid=_qid_of(row, default_qid), positives=passages(pos_ids, "pos_doc"),
                   negatives=passages(neg_ids, "neg_doc"), source=where, corpus_id=cid)


def load_examples(paths, *, skip_bad: bool = False) -> ExampleSet:
    """Read examples from inline JSONL and/or corpus-ID JSON files, in the order given.

    Args:
        paths: a list of file paths (a single path string is accepted too).
        skip_bad: skip and count bad examples instead of raising (file- and corpus-level
            problems always raise; see the module docstring).
    Returns:
        ExampleSet with the examples, the corpora, the skip counts and a ``summary()`` line.
    Raises:
        DataError naming the file and line/key of the first problem.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("no data files given (data_dir_list is empty)", "file_not_found")
    loader = _Loader(skip_bad)
    for i, path in enumerate(paths):
        loader.file_index = i
        loader.load_file(path)
    if not loader.examples:
        extra = f"; {loader.skips.summary()}" if loader.skips.counts else ""
        raise DataError(f"no usable examples in {paths}{extra}", "no_examples")
    return ExampleSet(examples=loader.examples, corpora=dict(loader.corpora), skipped=loader.skips.as_dict(),
                      dropped_negatives=loader.dropped_negatives, files=paths, skip_bad=skip_bad,
                      skip_messages=dict(loader.skips.first_message))

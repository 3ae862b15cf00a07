"""Build the quickstart's retrieval data offline from the Python standard library's docstrings.

Each documented module, function, class and method of a fixed list of stdlib modules gives one
example: the docstring's first paragraph (its summary) is the query, and the object's qualified
name followed by the rest of the docstring is the positive passage, like an API reference entry.
Short docstrings are dropped, duplicated summaries and passages are kept once, and each example
gets hard negatives: the highest-BM25 passages of the same split for its query (chosen with a
seeded RNG among the top few, so that near-copies do not always win). Output is inline JSONL:

    {"question_id": "stdlib:json.dumps", "query": "...", "pos_doc": "...", "neg_doc": ["...", ...]}

    python examples/make_docstring_data.py                    # writes examples/data/stdlib_{train,val}.jsonl
    python examples/make_docstring_data.py --out /tmp/d --seed 1 --train 1500 --val 200

Deterministic for a given seed *and Python version* (docstrings change between versions); the
shipped files record theirs in examples/data/README.md.
"""
import argparse
import warnings
import importlib
import inspect
import json
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict

MODULES = [
    "builtins", "abc", "argparse", "array", "ast", "base64", "binascii", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "collections.abc", "colorsys", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.message", "email.utils", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma",
    "mailbox", "math", "mimetypes", "netrc", "numbers", "operator", "os", "os.path", "pathlib", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "stat", "statistics", "string", "stringprep", "struct", "subprocess", "sys", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "tomllib", "trace", "traceback", "types",
    "typing", "unicodedata", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
    "asyncio", "bdb", "cmd", "code", "compileall", "contextvars", "copyreg", "ctypes", "dbm", "doctest",
    "email.headerregistry", "email.policy", "faulthandler", "fileinput", "getpass", "http.cookiejar", "http.server",
    "importlib", "importlib.metadata", "mmap", "modulefinder", "multiprocessing", "optparse", "pdb", "py_compile",
    "pyclbr", "pydoc", "runpy", "socketserver", "symtable", "tracemalloc", "unittest.mock", "urllib.robotparser",
    "wsgiref.handlers", "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipimport",
]

MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 4, 40
MIN_BODY_WORDS = 8
MAX_PASSAGE_CHARS = 300
NEGATIVES, NEG_POOL = 3, 8
# A docstring whose first line is a call signature ("S.count(sub[, start]) -> int") has it removed.
SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$|^.*\s->\s.*$")
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
WORD = re.compile(r"[a-z][a-z0-9_]+")
STOP = set("the a an of to and or in is be for if it as by on with this that are from not at its any can "
           "which will when return returns given".split())


def own_doc(obj) -> str | None:
    """The object's own docstring (inspect.getdoc would inherit a base class's)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def split_doc(doc: str):
    """(summary, body) from a cleaned docstring, or None when it is too short to use."""
    lines = doc.splitlines()
    while lines and (SIGNATURE.match(lines[0].strip()) or lines[0].strip() in ("", "--")):
        lines.pop(0)
    paras = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n") if p.strip()]
    if not paras:
        return None
    if len(paras) == 1:  # one paragraph: its first sentence is the summary
        sentences = SENTENCE_END.split(paras[0], maxsplit=1)
        if len(sentences) < 2:
            return None
        paras = sentences
    summary, body = paras[0], " ".join(paras[1:])
    if "->" in summary:  # a signature left in the summary ("zip(*iterables) --> Yield ...")
        return None
    if not MIN_SUMMARY_WORDS <= len(summary.split()) <= MAX_SUMMARY_WORDS or len(body.split()) < MIN_BODY_WORDS:
        return None
    return summary, body


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + " ..."


def defined_here(obj, modname: str) -> bool:
    """Defined by this module or by its C accelerator (os.listdir lives in posix, io.open in _io)."""
    home = getattr(obj, "__module__", None) or ""
    return (modname == "builtins" or home == modname or home.startswith((modname + ".", "_"))
            or home in ("posix", "nt"))


def documented_objects(modname: str):
    """(qualified name, object) for the module, its public functions/classes and their own methods."""
    mod = importlib.import_module(modname)
    yield modname, mod
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not defined_here(obj, modname):
            continue  # re-exported from another listed module: counted there
        qual = f"{modname}.{name}" if modname != "builtins" else name
        yield qual, obj
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                if not mname.startswith("_") and inspect.isroutine(getattr(obj, mname, None)):
                    yield f"{qual}.{mname}", vars(obj)[mname]


def collect():
    """All usable (qid, query, passage, module) in a fixed order, deduplicated."""
    out, seen_q, seen_p, seen_obj, missing = [], set(), set(), set(), []
    for modname in MODULES:
        try:
            objs = list(documented_objects(modname))
        except ImportError:
            missing.append(modname)
            continue
        for qual, obj in objs:
            if id(obj) in seen_obj:
                continue
            seen_obj.add(id(obj))
            doc = own_doc(obj)
            parts = split_doc(doc) if doc else None
            if not parts:
                continue
            summary, body = parts
            passage = clip(f"{qual}: {body}", MAX_PASSAGE_CHARS)
            kq, kp = summary.lower(), body.lower()
            if kq in seen_q or kp in seen_p:
                continue
            seen_q.add(kq)
            seen_p.add(kp)
            out.append({"qid": f"stdlib:{qual}", "query": summary, "passage": passage, "module": modname})
    if missing:
        print(f"note: modules not importable here, skipped: {missing}", file=sys.stderr)
    return out


def words(text: str):
    return [w for w in WORD.findall(text.lower()) if w not in STOP]


class BM25:
    """Plain BM25 (k1=1.2, b=0.75) over a list of passages, with an inverted index."""

    def __init__(self, passages, k1=1.2, b=0.75):
        self.k1, self.b = k1, b
        self.lens = []
        self.postings = defaultdict(list)
        for i, p in enumerate(passages):
            tf = Counter(words(p))
            self.lens.append(sum(tf.values()))
            for w, c in tf.items():
                self.postings[w].append((i, c))
        self.avg = sum(self.lens) / max(1, len(self.lens))
        n = len(passages)
        self.idf = {w: math.log(1 + (n - len(ps) + 0.5) / (len(ps) + 0.5)) for w, ps in self.postings.items()}

    def scores(self, query: str) -> dict:
        """{passage index: BM25 score} of the passages sharing a word with the query."""
        scores = defaultdict(float)
        for w in sorted(set(words(query))):  # fixed order: float sums independent of PYTHONHASHSEED
            for i, c in self.postings.get(w, ()):
                norm = c + self.k1 * (1 - self.b + self.b * self.lens[i] / self.avg)
                scores[i] += self.idf[w] * c * (self.k1 + 1) / norm
        return scores

    def top(self, query: str, k: int, exclude: int):
        scores = self.scores(query)
        scores.pop(exclude, None)
        return sorted(scores, key=lambda i: (-scores[i], i))[:k]


def with_negatives(rows, rng):
    """Attach NEGATIVES hard negatives to each row, drawn from the same rows' passages."""
    index = BM25([r["passage"] for r in rows])
    out = []
    for i, r in enumerate(rows):
        pool = index.top(r["query"], NEG_POOL, exclude=i)
        if len(pool) < NEGATIVES:  # a query sharing no word with others: same-module passages, then any
            extra = [j for j, o in enumerate(rows) if j != i and j not in pool and o["module"] == r["module"]]
            extra += [j for j in range(len(rows)) if j != i and j not in pool and j not in extra]
            pool += extra[: NEGATIVES - len(pool)]
        picks = sorted(rng.sample(pool, NEGATIVES), key=pool.index)
        out.append({"question_id": r["qid"], "query": r["query"], "pos_doc": r["passage"],
                    "neg_doc": [rows[j]["passage"] for j in picks]})
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1500, help="training examples (at most)")
    ap.add_argument("--val", type=int, default=200, help="validation examples")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():  # touching deprecated attributes (typing.io...) warns
        warnings.simplefilter("ignore")
        rows = collect()
    if len(rows) < args.val + NEGATIVES + 1:
        raise SystemExit(f"only {len(rows)} usable docstrings; need more than --val {args.val}")
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    val, train = rows[: args.val], rows[args.val: args.val + args.train]
    os.makedirs(args.out, exist_ok=True)
    for name, part in (("stdlib_train.jsonl", train), ("stdlib_val.jsonl", val)):
        path = os.path.join(args.out, name)
        write_jsonl(path, with_negatives(part, random.Random(f"{args.seed}:{name}")))
        print(f"{path}: {len(part)} examples, {os.path.getsize(path) / 1e6:.2f} MB")
    v = sys.version_info
    print(f"from {len(rows)} usable docstrings, Python {v.major}.{v.minor}.{v.micro}, seed {args.seed}")


if __name__ == "__main__":
    main()

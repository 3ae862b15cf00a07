"""Stable passage identifiers.

A passage's uid is a string that names the same passage in every process and every run:
``"<corpus_id>:<doc_id>"`` for a corpus document, ``"text:<sha1 of the text>"`` for inline text
(so two inline passages with identical text share a uid, and the loss masks a copy of a
query's positive elsewhere in the batch instead of counting it as a negative).

``passage_uid_to_int64`` turns a uid into the int64 the loss compares. Python's ``hash()`` is
salted per process (PYTHONHASHSEED), so it would differ across ranks; blake2b does not.

What the loss masks on is the passage's *text key* (``text_key``: the uid of its normalised
text), not its uid: a corpus document and an inline passage with the same text, or two corpus
documents with the same text under different ids, are the same passage to the model, so a copy
of a query's positive is masked whichever file and format it came from. The uid still names a
document (mining and evaluation read the doc id from it). For one corpus document the key is a
function of its uid (same doc, same text), so keying on the text only ever masks more copies.
"""
import hashlib
import unicodedata

__all__ = ["passage_uid_to_int64", "text_uid", "corpus_uid", "normalize_text", "text_key"]


def passage_uid_to_int64(uid: str) -> int:
    """Map a passage uid to a signed int64, identical in every process, rank and run.

    The first 8 bytes of blake2b(uid) read as a little-endian signed integer. Distinct uids
    collide with probability ~ n^2 / 2^65 (about 1e-8 for a million passages in one batch's
    world), which at worst masks one negative.
    """
    if not isinstance(uid, str):
        raise TypeError(f"passage uid must be a str, got {type(uid).__name__}: {uid!r}")
    digest = hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_uid(text: str) -> str:
    """The uid of an inline passage: ``"text:" + sha1(text)`` (identical text, identical uid)."""
    return "text:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def corpus_uid(corpus_id: str, doc_id: str) -> str:
    """The uid of a corpus document: ``"<corpus_id>:<doc_id>"``."""
    return f"{corpus_id}:{doc_id}"


def normalize_text(text: str) -> str:
    """The text two passages must share to count as the same: Unicode NFC, runs of whitespace
    collapsed to one space, stripped. Case and punctuation are kept (in code and in names they
    carry meaning)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_key(text: str) -> str:
    """The duplicate key of a passage (or query) text: ``text_uid(normalize_text(text))``, equal
    in both data formats; ``passage_uid_to_int64(text_key(t))`` is the id the loss masks on."""
    return text_uid(normalize_text(text))

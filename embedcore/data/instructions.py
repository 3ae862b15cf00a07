"""Per-dataset instructions as prefixes: the corpus metadata's ``query_instruction`` /
``passage_instruction`` (merlin_metadata.json), applied when ``use_instructions`` is on
(``dataloader.dataset.use_instructions``, ``mining.use_instructions``,
``python -m embedcore.evaluate --use-instructions``).

The rule, for one dataset (a corpus; inline JSONL has no metadata, so no instruction) and one
side (query or passage), given the configured prefix (``collate_fn.query_prefix`` / ``passage_prefix``):

1. the dataset has an instruction ``I`` for that side and the prefix contains ``{task}`` (a
   template, e.g. ``"Instruct: {task}\\nQuery:"``): the prefix is the template with ``{task}``
   replaced by ``I``;
2. the dataset has an instruction ``I`` and the prefix has no ``{task}``: the prefix is ``I``
   (the dataset's instruction overrides the global prefix);
3. no instruction (key missing or empty): the configured prefix as it is; a template is then an
   error naming the dataset (its ``{task}`` would reach the model literally).

Texts are joined as always, ``prefix + " " + text`` (collator.with_prefix), so the E5 / NV-Embed
template ``"Instruct: {task}\\nQuery: {query}"`` is written ``query_prefix: "Instruct: {task}\\nQuery:"``
(no trailing space: the join adds it, and the export's prompt carries it). With
``use_instructions`` off the configured prefixes are used as they are (today's behaviour).

The export (``export_prompts``) records what training fed as sentence-transformers prompts:
``"query"`` / ``"document"`` are the prefixes every training example shared (so
``model.encode(q, prompt_name="query")`` is what was trained); when datasets resolved to
different prefixes they are the configured ones (left out when they are templates), and each
corpus also gets ``"<corpus_id>:query"`` / ``"<corpus_id>:document"``, which mining and
evaluation use for that corpus.
"""
from __future__ import annotations

from embedcore.data.errors import DataError

__all__ = ["TASK", "resolve_prefix", "dataset_prefixes", "export_prompts", "prompt_names", "corpus_instructions"]

TASK = "{task}"


def prompt_names(dataset: str) -> tuple[str, str]:
    """The export's prompt names for one corpus: ``("<id>:query", "<id>:document")``."""
    return f"{dataset}:query", f"{dataset}:document"


def resolve_prefix(prefix: str | None, instruction: str | None, where: str) -> str:
    """The prefix of one dataset's texts under the rule of the module docstring.

    ``where`` names the dataset (and side) for the error of a template without an instruction.
    """
    prefix = prefix or ""
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"{where}: instruction must be a string, got {instruction!r}", "bad_instruction")
    if not instruction:
        if TASK in prefix:
            raise DataError(f"{where}: the prefix {prefix!r} is a template with {TASK} but this dataset has no "
                            f"instruction to fill it with (add it to merlin_metadata.json or use a plain prefix)",
                            "bad_instruction")
        return prefix
    if TASK in prefix:
        return prefix.replace(TASK, instruction)
    return instruction


def corpus_instructions(corpus) -> tuple[str | None, str | None]:
    """(query_instruction, passage_instruction) of a Corpus (None for inline data)."""
    if corpus is None:
        return None, None
    return corpus.query_instruction, corpus.passage_instruction


def dataset_prefixes(examples, query_prefix: str | None, passage_prefix: str | None) -> dict:
    """{corpus_id (None for inline examples): (query prefix, passage prefix)} for every dataset
    the examples use, resolved by the rule. Raises DataError (naming the corpus or the file) for a
    template without an instruction."""
    corpora = getattr(examples, "corpora", None) or {}
    out: dict = {}
    for ex in examples:
        if ex.corpus_id in out:
            continue
        corpus = corpora.get(ex.corpus_id) if ex.corpus_id is not None else None
        qi, pi = corpus_instructions(corpus)
        name = (f"corpus {ex.corpus_id!r} ({corpus.path})" if corpus is not None
                else f"{ex.source.rsplit(':', 1)[0]} (inline JSONL, no corpus metadata)")
        out[ex.corpus_id] = (resolve_prefix(query_prefix, qi, f"{name}: query_prefix"),
                             resolve_prefix(passage_prefix, pi, f"{name}: passage_prefix"))
    return out


def export_prompts(prefixes: dict | None, query_prefix: str | None, passage_prefix: str | None):
    """(default query prefix, default passage prefix, {prompt name: prefix}) to export.

    ``prefixes`` is dataset_prefixes' mapping (None when instructions were off: the configured
    prefixes, no named prompts). The defaults become the ``query`` / ``document`` prompts.
    """
    if not prefixes:
        return query_prefix, passage_prefix, {}
    pairs = set(prefixes.values())
    if len(pairs) == 1:
        q, p = next(iter(pairs))
    else:  # datasets differ: the configured prefixes, unless they are unfilled templates
        q = None if TASK in (query_prefix or "") else query_prefix
        p = None if TASK in (passage_prefix or "") else passage_prefix
    named = {}
    for cid, (qp, pp) in sorted((k, v) for k, v in prefixes.items() if k is not None):
        qn, pn = prompt_names(cid)
        named[qn], named[pn] = qp, pp
    return q, p, named

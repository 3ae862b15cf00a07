"""Tokenisation of query/passage groups into the tensors the biencoder consumes.

Text rule (as the reference, COMPAT.md): ``prefix + " " + text`` when the prefix is non-empty,
else the text itself. So ``query_prefix="query:"`` gives ``"query: how ..."``; a prefix that
already ends in a space gets a second one. The sentence-transformers export must therefore
write the prompt as ``prefix + " "`` to embed identically.

Truncation is always on the right, to ``q_max_len`` / ``p_max_len`` tokens (special tokens
included); padding goes to the longest row of the batch, rounded up to ``pad_to_multiple_of``
(the padded length may thus exceed the max length by less than the multiple, as in
transformers). Special tokens are whatever the tokenizer adds by itself (BOS for Llama, CLS/SEP
for BERT...), which is also what sentence-transformers does, so training and export agree.

Tokenizers without a pad token (Llama, Mistral and many other decoders): the collator sets
``tokenizer.pad_token = tokenizer.eos_token`` *on the tokenizer object*, so the tokenizer saved
with the export pads the same way. Padding side: the tokenizer's own ``padding_side`` is kept
(Llama-3 and Qwen2 tokenizers usually say "right", some chat tokenizers "left"); pool_l2 finds
the first/last real token from the attention mask on either side, so both are correct. Passing
``padding_side`` ("left" reproduces the reference, which pads decoders on the left) sets it on
the tokenizer too, and the export saves ``tokenizer.padding_side``.
"""
import torch

from embedcore.data.ids import passage_uid_to_int64, text_key

__all__ = ["BiencoderCollator", "encode_texts", "prepare_tokenizer", "with_prefix", "pad_rows"]


def with_prefix(prefix: str, text: str) -> str:
    """``prefix + " " + text`` when prefix is non-empty, else ``text`` (the reference's rule)."""
    return f"{prefix} {text}" if prefix else text


def prepare_tokenizer(tokenizer, padding_side: str | None = None):
    """Give ``tokenizer`` a pad token (EOS when it has none) and, if given, a padding side.

    Mutates and returns the tokenizer, so that saving it records what training used.
    Raises ValueError when there is neither a pad nor an EOS token, or a bad padding_side.
    """
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token "
                             f"to pad with; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_texts(tokenizer, texts, max_len: int, prefix: str = "", pad_to_multiple_of: int | None = None) -> dict:
    """Tokenise ``texts`` exactly as training does: prefix rule, right truncation, padding.

    Returns ``{"input_ids": LongTensor [N, L], "attention_mask": LongTensor [N, L]}``. The
    tokenizer must already have a pad token (see prepare_tokenizer); its padding_side is used.
    Mining and evaluation call this so that their spacing and truncation equal training's.
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a list of strings, got one str")
    if max_len is None or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if tokenizer.pad_token is None:
        raise ValueError("tokenizer has no pad token; call embedcore.data.collator.prepare_tokenizer first")
    texts = [with_prefix(prefix, t) for t in texts]
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "right"  # the reference truncates on the right; restore the user's setting after
    try:
        rows = tokenizer(texts, truncation=True, max_length=max_len, padding=False,
                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    # Padded here rather than by the tokenizer: transformers refuses a max_length that is not a
    # multiple of pad_to_multiple_of even when padding only to the batch's longest row.
    return pad_rows(rows, tokenizer.pad_token_id, tokenizer.padding_side, pad_to_multiple_of)


def pad_rows(rows, pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> dict:
    """Pad token-id lists to the longest (rounded up to pad_to_multiple_of) on ``padding_side``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(r) for r in rows), default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.int64)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


class BiencoderCollator:
    """Collate RetrievalDataset items into query and passage tensors.

    Output (B queries, n passages each):
        q_input_ids, q_attention_mask: [B, Lq]
        p_input_ids, p_attention_mask: [B*n, Lp]; query i's passages are rows i*n .. i*n+n-1,
            its positive first
        passage_ids: int64 [B*n], passage_uid_to_int64 of each passage's text key (equal
            normalised text -> equal id, in both data formats; see embedcore.data.ids), for
            masking copies of a positive
        teacher_scores: float32 [B, n], only when every passage of the batch carries a teacher
            score (``passage_scores``; for score distillation)

    Items may carry their own ``query_prefix`` / ``passage_prefix`` (per-dataset instructions,
    see embedcore.data.instructions); they replace the collator's for that item's texts.

    Args: the tokenizer (given a pad token / padding side by prepare_tokenizer, see the module
    docstring), max lengths, prefixes (``prefix + " " + text``), pad_to_multiple_of, padding_side.
    """

    def __init__(self, tokenizer, q_max_len: int = 512, p_max_len: int = 512, query_prefix: str = "",
                 passage_prefix: str = "", pad_to_multiple_of: int | None = None, padding_side: str | None = None):
        self.tokenizer = prepare_tokenizer(tokenizer, padding_side)
        self.q_max_len, self.p_max_len = int(q_max_len), int(p_max_len)
        self.query_prefix = query_prefix or ""
        self.passage_prefix = passage_prefix or ""
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        n = len(items[0]["passages"])
        for k, item in enumerate(items):
            if len(item["passages"]) != n or len(item["passage_uids"]) != n:
                raise ValueError(f"batch item {k} (qid {item.get('qid')!r}) has {len(item['passages'])} passages and "
                                 f"{len(item['passage_uids'])} uids; item 0 has {n}: every query needs the same count")
        # Each text gets its item's prefix (the collator's unless the item carries one), then is
        # encoded with no further prefix: the same strings as prefixing in encode_texts.
        queries = [with_prefix(it.get("query_prefix", self.query_prefix), it["query"]) for it in items]
        passages = [with_prefix(it.get("passage_prefix", self.passage_prefix), t) for it in items
                    for t in it["passages"]]
        q = encode_texts(self.tokenizer, queries, self.q_max_len, "", self.pad_to_multiple_of)
        p = encode_texts(self.tokenizer, passages, self.p_max_len, "", self.pad_to_multiple_of)
        # Keyed on the text, not the uid: the same text from a corpus and from inline JSONL (or
        # under two doc ids) is one passage, and its copies must be masked (ids.py).
        ids = [passage_uid_to_int64(text_key(t)) for it in items for t in it["passages"]]
        batch = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
                 "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"],
                 "passage_ids": torch.tensor(ids, dtype=torch.int64)}
        scores = [it.get("passage_scores") for it in items]
        if all(sc is not None and None not in sc for sc in scores):  # every passage has a teacher score
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32)  # [B, n]
        return batch

"""Small local tokenizers for tests (no downloads): a word-level one and a tiny trained BPE,
each wrapped in transformers.PreTrainedTokenizerFast, in an encoder flavour (BERT-like: [CLS]
text [SEP], has [PAD]) or a decoder flavour (Llama-like: <s> text, EOS </s>, no pad token).

    tok = word_tokenizer()                          # encoder, pads right with [PAD]
    tok = word_tokenizer(kind="decoder")            # no pad token, like Llama
    tok = bpe_tokenizer(texts, vocab_size=300)      # decoder-flavoured byte-level BPE
"""
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "return the number of items in a sequence",
    "open a file and return a stream object",
    "split the string at the separator and return a list of parts",
    "query passage positive negative document embedding model",
    "what is python a programming language a snake",
    "one two three four five six seven eight nine ten",
]

ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIALS = ["<unk>", "<s>", "</s>"]


def _wrap(tk: Tokenizer, kind: str, pad: bool | None, padding_side: str) -> PreTrainedTokenizerFast:
    if kind == "encoder":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
        kw = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                  pad_token="[PAD]" if pad in (None, True) else None)
    elif kind == "decoder":
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))])
        kw = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>" if pad else None)
    else:
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, padding_side=padding_side, **kw)
    if tok.pad_token is not None and not pad and kind == "decoder":
        raise AssertionError("decoder fixture should have no pad token")
    return tok


def word_tokenizer(texts=(), *, kind: str = "encoder", pad: bool | None = None,
                   padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A lowercasing whitespace/punctuation word-level tokenizer over SENTENCES + ``texts``.

    kind="encoder": [CLS] $A [SEP], pad [PAD] (pad=False removes it).
    kind="decoder": <s> $A, EOS </s>, no pad token unless pad=True (then pad = EOS).
    Unknown words map to the unk token, so any text encodes.
    """
    specials = ENCODER_SPECIALS if kind == "encoder" else DECODER_SPECIALS
    words = []
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    for s in [*SENTENCES, *texts]:
        for w, _ in pre.pre_tokenize_str(s.lower()):
            if w not in words:
                words.append(w)
    vocab = {t: i for i, t in enumerate([*specials, *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1] if kind == "encoder" else "<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre
    return _wrap(tk, kind, pad, padding_side)


def bpe_tokenizer(texts=(), *, vocab_size: int = 300, kind: str = "decoder", pad: bool | None = None,
                  padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on SENTENCES + ``texts`` in well under a second."""
    specials = ENCODER_SPECIALS if kind == "encoder" else DECODER_SPECIALS
    tk = Tokenizer(models.BPE(unk_token=specials[1] if kind == "encoder" else "<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([*SENTENCES, *texts], trainer=trainer)
    return _wrap(tk, kind, pad, padding_side)

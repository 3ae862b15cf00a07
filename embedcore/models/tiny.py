"""A tiny Llama-architecture model and its tokenizer, built locally (no downloads).

Used by the tests and by the quickstart: `make_tiny_llama(out_dir, texts)` trains a byte-level BPE
tokenizer on `texts` on the spot, builds a randomly initialised `LlamaModel` and saves both as an
ordinary Hugging Face folder that `AutoModel` / `AutoTokenizer` / `load_backbone` read.

Tokenizer decisions (they mirror Llama 3, so the quickstart exercises the same paths as a real one):
- byte-level BPE (any text is encodable, no unknown token);
- `<s>` (BOS) is prepended and `</s>` (EOS) appended by the tokenizer's post-processor, so every
  consumer that tokenises with `add_special_tokens=True` (our collator, sentence-transformers) sees
  the same ids, and `last` pooling lands on EOS;
- NO pad token, like Llama 3: `embedcore.models.backbone.prepare_tokenizer` then uses EOS as pad and
  pads on the left (the reference's behaviour); the export records both in tokenizer_config.json.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from embedcore.files import write_json

BOS, EOS = "<s>", "</s>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `texts`; returns a transformers fast tokenizer (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_bpe_tokenizer: no non-empty text to train the tokenizer on")
    if vocab_size < 260:  # 256 byte symbols + the specials must fit
        raise ValueError(f"train_bpe_tokenizer: vocab_size must be >= 260 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            pair=f"{BOS} $A {EOS} {BOS} $B {EOS}",
            special_tokens=[(BOS, bos_id), (EOS, eos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, padding_side="left", model_max_length=4096
    )


def make_tiny_llama(
    out_dir: str,
    texts: Iterable[str],
    vocab_size: int = 1024,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> str:
    """Train a BPE tokenizer on `texts`, build a random-init Llama (`LlamaModel`) and save both to `out_dir`.

    `kv_heads < heads` on purpose (grouped-query attention, as in Llama 3). Returns `out_dir`.
    The quickstart uses e.g. hidden_size=128, layers=2..4, vocab_size=4096.
    """
    from transformers import LlamaConfig, LlamaModel

    if hidden_size % heads:
        raise ValueError(f"make_tiny_llama: hidden_size {hidden_size} must be divisible by heads {heads}")
    if heads % kv_heads:
        raise ValueError(f"make_tiny_llama: heads {heads} must be divisible by kv_heads {kv_heads}")
    texts = list(texts)
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        use_cache=False,
    )
    # Seed only a private generator's worth of state: fork so the caller's global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    made = {"made_by": "embedcore.models.tiny.make_tiny_llama", "seed": seed, "n_training_texts": len(texts)}
    write_json(os.path.join(out_dir, "embedcore_tiny.json"), made, indent=2)
    return out_dir

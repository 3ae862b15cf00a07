"""Build a tiny random-init Llama + a BPE tokenizer trained on the spot, as a local Hugging Face folder.

    python examples/make_tiny_llama.py --out /tmp/tiny-llama                       # trained on the quickstart data
    python examples/make_tiny_llama.py --out /tmp/t --texts my.jsonl --hidden 128 --layers 4 --vocab 4096

--texts: JSONL files of the trainer's inline format (query / question, pos_doc, neg_doc: every text
field is used) or plain text files (one text a line). No downloads.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from embedcore.models.tiny import make_tiny_llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXTS = [os.path.join(HERE, "data", "stdlib_train.jsonl")]


def _texts_of(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict) and isinstance(value.get("text"), str):
        yield value["text"]
    elif isinstance(value, list):
        for v in value:
            yield from _texts_of(v)


def read_texts(paths):
    """Every text of JSONL (query/question/pos_doc/neg_doc fields) or plain-text files."""
    texts = []
    for path in paths:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise SystemExit(f"{path}:{lineno}: not JSON: {e}")
                    for key in ("query", "question", "pos_doc", "neg_doc"):
                        texts.extend(_texts_of(row.get(key)))
                else:
                    texts.append(line)
    return texts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--texts", nargs="+", default=DEFAULT_TEXTS, help="JSONL or text files to train the tokenizer on")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    texts = read_texts(args.texts)
    out = make_tiny_llama(args.out, texts, vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads, seed=args.seed)
    print(f"tiny Llama ({args.layers} layers, hidden {args.hidden}, vocab <= {args.vocab}, "
          f"tokenizer trained on {len(texts)} texts) saved to {out}")


if __name__ == "__main__":
    main()

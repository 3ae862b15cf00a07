"""Models, batches and reference steps for the cached-encoding tests (tests/test_grad_cache.py and
the two-rank script it runs under torchrun)."""
import contextlib
import json
import math
import os
import shutil

import torch

from embedcore.train.grad_cache import encode_in_chunks, plan_chunks

VOCAB = 300  # the tiny Llama's (train_fixture.make_model) and the tiny BERT's
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def llama_folder(base: str, attention_dropout: float) -> str:
    """The tiny Llama of train_fixture, with `attention_dropout` written into its config.json."""
    from train_fixture import make_model

    plain = make_model(os.path.join(base, "llama"))
    if not attention_dropout:
        return plain
    folder = os.path.join(base, f"llama_dropout_{attention_dropout}")
    if not os.path.isdir(folder):
        shutil.copytree(plain, folder)
        path = os.path.join(folder, "config.json")
        cfg = json.load(open(path))
        cfg["attention_dropout"] = attention_dropout
        json.dump(cfg, open(path, "w"))
    return folder


def build_model(family: str, pooling: str, shared: bool, lora_dropout: float | None, dropout: float,
                base: str | None = None, seed: int = 0):
    """A Biencoder in training mode: family "llama" (left padding, attention dropout in its config)
    or "bert" (right padding, hidden and attention dropout in its config); lora_dropout None: no LoRA."""
    from embedcore.models.biencoder import Biencoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "llama":
            model = Biencoder.from_pretrained(llama_folder(base, dropout), share_encoder=shared, pooling=pooling)
            if dropout:
                assert model.query_encoder.config.attention_dropout == dropout
        elif family == "bert":
            from transformers import BertConfig, BertModel

            cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                             attention_probs_dropout_prob=dropout)
            enc = BertModel(cfg, add_pooling_layer=False)
            passage = None if shared else BertModel(cfg, add_pooling_layer=False)
            model = Biencoder(enc, passage, pooling=pooling)  # right padding (the default)
        else:
            raise ValueError(family)
        if lora_dropout is not None:
            from embedcore.lora.apply import apply_lora

            apply_lora(model, target_modules=LORA_TARGETS[family], r=4, alpha=8, dropout=lora_dropout)
            for name, p in model.named_parameters():  # LoRA B starts at zero: give it a value
                if name.endswith("lora_B.weight"):
                    p.data.normal_(0, 0.05)
    return model.train()


def make_batch(n_queries: int, n_passages: int, side: str, pad_id: int, seed: int = 0,
               max_q: int = 9, max_p: int = 14, extra: int = 3) -> dict:
    """A collated-like batch of random token ids with real lengths spread out, `extra` all-padding
    columns, padded on `side`. Duplicates of query 0's positive: query 1's first negative (same
    rank) and the last query's last passage (the other rank in the two-rank split)."""
    g = torch.Generator().manual_seed(seed)

    def rows(n, max_len):
        width = max_len + extra
        ids = torch.full((n, width), pad_id, dtype=torch.int64)
        mask = torch.zeros((n, width), dtype=torch.int64)
        for i, length in enumerate(torch.randint(2, max_len + 1, (n,), generator=g).tolist()):
            cols = slice(0, length) if side == "right" else slice(width - length, width)
            ids[i, cols] = torch.randint(2, VOCAB, (length,), generator=g)
            mask[i, cols] = 1
        return ids, mask

    q_ids, q_mask = rows(n_queries, max_q)
    p_ids, p_mask = rows(n_queries * n_passages, max_p)
    passage_ids = torch.arange(n_queries * n_passages, dtype=torch.int64) + 1000
    for dup in (n_passages + 1, n_queries * n_passages - 1):
        p_ids[dup], p_mask[dup], passage_ids[dup] = p_ids[0], p_mask[0], passage_ids[0]
    return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids, "p_attention_mask": p_mask,
            "passage_ids": passage_ids}


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    """Rank `rank`'s share of a global batch (its queries and their passages)."""
    B = batch["q_input_ids"].shape[0]
    n = batch["p_input_ids"].shape[0] // B
    b = B // world
    q, p = slice(rank * b, (rank + 1) * b), slice(rank * b * n, (rank + 1) * b * n)
    return {k: v[q] if k.startswith("q_") else v[p] for k, v in batch.items()}


def objective_for(pooling: str):
    from embedcore.train.objective import ColbertObjective, PooledObjective

    return ColbertObjective(0.05, max_passage_len=32) if pooling == "colbert" else PooledObjective(0.05)


def plain_step(model, objective, batch, info, loss_scale: float = 1.0, autocast=contextlib.nullcontext):
    """Today's micro step (Trainer._micro_step): everything encoded at once with grad."""
    with autocast():
        q = model.encode(batch["q_input_ids"], batch["q_attention_mask"], "query")
        p = model.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
    loss = objective.train_loss(q, batch["q_attention_mask"], p, batch["p_attention_mask"],
                                batch.get("passage_ids"), info)
    (loss * loss_scale).backward()
    return loss.detach()


def chunked_plain_step(model, objective, batch, chunk_size, info, loss_scale: float = 1.0, padding_aware=True):
    """The same chunks as cached_step, encoded WITH grad one after the other (the RNG running on
    from chunk to chunk, as in cached_step's pass 1), then one loss and one backward over the
    whole graph: no gradient caching, so the reference for cached_step with dropout on."""
    qc = plan_chunks(batch["q_attention_mask"], chunk_size, padding_aware)
    pc = plan_chunks(batch["p_attention_mask"], chunk_size, padding_aware)
    q = encode_in_chunks(model, batch["q_input_ids"], batch["q_attention_mask"], "query", qc)
    p = encode_in_chunks(model, batch["p_input_ids"], batch["p_attention_mask"], "passage", pc)
    loss = objective.train_loss(q, batch["q_attention_mask"], p, batch["p_attention_mask"],
                                batch.get("passage_ids"), info)
    (loss * loss_scale).backward()
    return loss.detach()


def grads(model) -> dict:
    """{name: gradient} of every trainable parameter (each must have one)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} has no gradient"
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def grad_norm(g: dict) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in g.values()))


def max_rel_diff(got: dict, want: dict) -> float:
    """max |got - want| over every gradient entry, relative to the global norm of `want`."""
    assert got.keys() == want.keys()
    diff = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    return diff / grad_norm(want)


def run_seeded(fn, seed: int = 123):
    """fn() from a fixed global RNG state, the model's gradients zeroed first by the caller."""
    torch.manual_seed(seed)
    return fn()

"""Biencoder: shared / separate encoders, encode through pool_l2, forward, blocks, dtype."""
import pytest
import torch

import embedcore
from embedcore.models.backbone import load_tokenizer
from embedcore.models.biencoder import Biencoder
from embedcore.models.tiny import make_tiny_llama

TEXTS = [f"Sentence {i} about parsing files, adding numbers and sorting lists." for i in range(60)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), TEXTS, vocab_size=300, hidden_size=32,
                           layers=3, heads=4, kv_heads=2, seed=2)


def _batch(tok, n_q=3, n_p=6):
    q = tok([f"query {i} " + "word " * i for i in range(n_q)], padding=True, return_tensors="pt")
    p = tok([f"passage {i} " + "text " * (2 * i) for i in range(n_p)], padding=True, return_tensors="pt")
    return {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
            "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"]}


def test_shared_encoder_is_one_module(tiny):
    b = Biencoder.from_pretrained(tiny)
    assert b.share_encoder and b.passage_encoder is b.query_encoder
    assert all(k.startswith("query_encoder.") for k in b.state_dict())
    assert len(b.transformer_blocks()) == 3
    assert (b.pooling, b.l2_normalize) == ("avg", True)  # defaults for a plain model folder


def test_separate_encoder_is_a_trainable_copy(tiny):
    b = Biencoder.from_pretrained(tiny, share_encoder=False)
    assert not b.share_encoder and b.passage_encoder is not b.query_encoder
    q_params = dict(b.query_encoder.named_parameters())
    p_params = dict(b.passage_encoder.named_parameters())
    assert q_params.keys() == p_params.keys()
    assert all(q_params[k].data_ptr() != p_params[k].data_ptr() for k in q_params)
    assert {k.split(".")[0] for k in b.state_dict()} == {"query_encoder", "passage_encoder"}
    assert len(b.transformer_blocks()) == 6
    assert b.passage_encoder.config.is_causal is False  # the copy is bidirectional too
    tok = load_tokenizer(tiny)
    batch = _batch(tok)
    q, p = b(batch)
    (q.sum() + p.sum()).backward()
    assert q_params["layers.0.mlp.up_proj.weight"].grad is not None
    assert p_params["layers.0.mlp.up_proj.weight"].grad is not None
    with torch.no_grad():
        p_params["layers.0.mlp.up_proj.weight"].add_(torch.randn_like(p_params["layers.0.mlp.up_proj.weight"]))
    q2 = b.encode(batch["p_input_ids"], batch["p_attention_mask"], "query")
    p2 = b.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
    assert not torch.allclose(q2, p2, atol=1e-3)  # passage encoder changed alone


@pytest.mark.parametrize("pooling", ["avg", "weighted_avg", "cls", "last", "colbert"])
@pytest.mark.parametrize("normalize", [True, False])
def test_encode_is_pool_l2_of_the_hidden_states(tiny, pooling, normalize):
    b = Biencoder.from_pretrained(tiny, pooling=pooling, l2_normalize=normalize, pooling_backend="torch")
    batch = _batch(load_tokenizer(tiny))
    ids, mask = batch["p_input_ids"], batch["p_attention_mask"]
    with torch.no_grad():
        got = b.encode(ids, mask, "passage")
        hidden = b.query_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    want = embedcore.pool_l2(hidden, mask, pooling, normalize, backend="torch")
    assert got.shape == ((6, ids.shape[1], 32) if pooling == "colbert" else (6, 32))
    torch.testing.assert_close(got, want)
    if normalize and pooling != "colbert":
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(6))


def test_forward_shapes_and_errors(tiny):
    b = Biencoder.from_pretrained(tiny)
    q, p = b(_batch(load_tokenizer(tiny), n_q=2, n_p=5))
    assert q.shape == (2, 32) and p.shape == (5, 32)
    with pytest.raises(KeyError, match="p_input_ids"):
        b({"q_input_ids": None, "q_attention_mask": None, "p_attention_mask": None})
    with pytest.raises(ValueError, match="kind"):
        b.encode(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), "doc")
    with pytest.raises(ValueError, match="pooling"):
        Biencoder.from_pretrained(tiny, pooling="max")


def test_st_folder_gives_defaults_and_caller_overrides(minilm_path):
    b = Biencoder.from_pretrained(minilm_path)
    assert (b.pooling, b.l2_normalize, b.padding_side, b.is_decoder) == ("avg", True, "right", False)
    assert len(b.transformer_blocks()) == 6
    b = Biencoder.from_pretrained(minilm_path, pooling="cls", l2_normalize=False)
    assert (b.pooling, b.l2_normalize) == ("cls", False)


def test_bf16_load(tiny):
    b = Biencoder.from_pretrained(tiny, torch_dtype="bfloat16")
    assert next(b.parameters()).dtype == torch.bfloat16
    q, _ = b(_batch(load_tokenizer(tiny)))
    assert q.dtype == torch.bfloat16 and torch.isfinite(q.float()).all()
    with pytest.raises(ValueError, match="torch_dtype"):
        Biencoder.from_pretrained(tiny, torch_dtype="int8")


def test_other_encoders_are_used_as_they_are(tmp_path):
    from transformers import AutoModel, ModernBertConfig, RobertaConfig, XLMRobertaConfig

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for cfg in (RobertaConfig(**small), XLMRobertaConfig(**small), ModernBertConfig(cls_token_id=1, sep_token_id=2, **small)):
        folder = str(tmp_path / cfg.model_type)
        torch.manual_seed(0)
        AutoModel.from_config(cfg).save_pretrained(folder)
        b = Biencoder.from_pretrained(folder, share_encoder=False)
        assert not b.is_decoder and b.padding_side == "right", cfg.model_type
        assert len(b.transformer_blocks()) == 4 and len(b.fsdp_units()) == 6
        ids = torch.randint(3, 60, (2, 9))
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        q = b.encode(ids, mask)
        # right padding changes nothing for the real tokens of an encoder
        torch.testing.assert_close(q[0], b.encode(ids[:1, :6], mask[:1, :6])[0], rtol=1e-4, atol=1e-5)

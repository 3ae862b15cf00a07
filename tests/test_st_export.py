"""The consolidated export loads in sentence-transformers as it is and gives our embeddings (cos >= 0.9999)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from embedcore.models.backbone import load_tokenizer
from embedcore.models.biencoder import Biencoder
from embedcore.models.tiny import make_tiny_llama

TEXTS = [f"Document {i}: how to open a file, read its lines and count the words in {i} ways." for i in range(80)]
# one text alone (no padding), and a batch of very different lengths (padding on every row but one)
SINGLE = ["how do I read a file"]
MIXED = ["sum", "sort a list of numbers in place", "open the file, read every line, strip it and count words",
         "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), TEXTS, vocab_size=320, hidden_size=32,
                           layers=2, heads=4, kv_heads=2, seed=3)


def _st(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu", local_files_only=True)


def _ours(b, tok, texts, prefix, kind):
    """Our side exactly as training feeds it: prefix + " " + text, tokenised by the training tokenizer."""
    texts = [f"{prefix} {t}" if prefix else t for t in texts]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return b.encode(enc["input_ids"], enc["attention_mask"], kind)


def _assert_same(st_model, b, tok, q_prefix, p_prefix, roles=("query", "passage")):
    """ST's query / document prompts vs our encoders `roles` fed prefix + " " + text."""
    for texts in (SINGLE, MIXED):
        st_q = st_model.encode(texts, prompt_name="query", convert_to_tensor=True, batch_size=8)
        st_p = st_model.encode(texts, prompt_name="document", convert_to_tensor=True, batch_size=8)
        cos_q = F.cosine_similarity(st_q.float(), _ours(b, tok, texts, q_prefix, roles[0]).float())
        cos_p = F.cosine_similarity(st_p.float(), _ours(b, tok, texts, p_prefix, roles[1]).float())
        assert cos_q.min() >= 0.9999, (texts, cos_q)
        assert cos_p.min() >= 0.9999, (texts, cos_p)


def test_encoder_round_trip(minilm_path, tmp_path):
    b = Biencoder.from_pretrained(minilm_path)
    tok = load_tokenizer(minilm_path)
    out = b.save_pretrained(str(tmp_path / "export"), tok, "query:", "passage:", max_seq_length=128)
    st = _st(out)
    assert st.max_seq_length == 128 and st.tokenizer.padding_side == "right"
    _assert_same(st, b, tok, "query:", "passage:")


@pytest.mark.parametrize("pooling", ["avg", "weighted_avg", "cls", "last"])
def test_bidirectional_llama_round_trip(tiny, tmp_path, pooling):
    b = Biencoder.from_pretrained(tiny, pooling=pooling)
    tok = load_tokenizer(tiny)
    out = b.save_pretrained(str(tmp_path / "export"), tok, "query:", "passage:", max_seq_length=64)
    st = _st(out)
    assert st.tokenizer.padding_side == "left" and st.tokenizer.pad_token == "</s>"
    _assert_same(st, b, tok, "query:", "passage:")


def test_exported_config_alone_is_bidirectional(tiny, tmp_path):
    """What sentence-transformers relies on: a fresh AutoModel of the export, nothing else, is bidirectional."""
    from transformers import AutoModel

    from embedcore.models.bidirectional import check_bidirectional

    out = Biencoder.from_pretrained(tiny).save_pretrained(str(tmp_path / "e"), load_tokenizer(tiny), None, None)
    assert json.load(open(os.path.join(out, "config.json")))["is_causal"] is False
    for attn in ("eager", "sdpa"):
        check_bidirectional(AutoModel.from_pretrained(out, attn_implementation=attn))
    with pytest.raises(RuntimeError):  # the original folder (no is_causal) stays causal
        check_bidirectional(AutoModel.from_pretrained(tiny))


def test_export_files(tiny, tmp_path):
    b = Biencoder.from_pretrained(tiny, pooling="last")
    out = b.save_pretrained(str(tmp_path / "e"), load_tokenizer(tiny), "query:", "", max_seq_length=96)
    modules = json.load(open(os.path.join(out, "modules.json")))
    assert [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules] == [
        ("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    pool = json.load(open(os.path.join(out, "1_Pooling", "config.json")))
    assert pool == {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
                    "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
                    "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True}
    cfg = json.load(open(os.path.join(out, "config_sentence_transformers.json")))
    assert cfg["prompts"] == {"query": "query: "} and cfg["similarity_fn_name"] == "cosine"
    assert json.load(open(os.path.join(out, "sentence_bert_config.json"))) == {"max_seq_length": 96, "do_lower_case": False}
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(out))
    tok_cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tok_cfg["padding_side"] == "left" and tok_cfg["pad_token"] == "</s>"
    assert "local_files_only" not in tok_cfg
    # unnormalised: no Normalize module, dot similarity
    b.l2_normalize = False
    out2 = b.save_pretrained(str(tmp_path / "e2"), load_tokenizer(tiny), None, None)
    assert len(json.load(open(os.path.join(out2, "modules.json")))) == 2
    assert json.load(open(os.path.join(out2, "config_sentence_transformers.json")))["similarity_fn_name"] == "dot"


def test_separate_passage_encoder_is_exported(tiny, tmp_path):
    b = Biencoder.from_pretrained(tiny, share_encoder=False)
    with torch.no_grad():
        for p in b.passage_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = load_tokenizer(tiny)
    out = b.save_pretrained(str(tmp_path / "e"), tok, "query:", "passage:", 64)
    q_st, p_st = _st(out), _st(os.path.join(out, "passage_encoder"))
    _assert_same(q_st, b, tok, "query:", "passage:", roles=("query", "query"))  # the root: query encoder
    _assert_same(p_st, b, tok, "query:", "passage:", roles=("passage", "passage"))
    # and our own loader gets both back
    back = Biencoder.from_pretrained(out, share_encoder=False)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    assert back.backbone_info["query_prefix"] == "query:" and back.backbone_info["passage_prefix"] == "passage:"


def test_colbert_exports_without_st_files(tiny, tmp_path, caplog):
    b = Biencoder.from_pretrained(tiny, pooling="colbert")
    out = b.save_pretrained(str(tmp_path / "e"), load_tokenizer(tiny), "q", "p")
    assert not os.path.exists(os.path.join(out, "modules.json"))
    assert "no sentence-transformers files" in caplog.text
    back = Biencoder.from_pretrained(out)
    assert back.pooling == "colbert" and back.backbone_info["query_prefix"] == "q"


def test_unmerged_extra_weights_are_refused(tiny, tmp_path):
    b = Biencoder.from_pretrained(tiny)
    sd = dict(b.state_dict())
    sd["query_encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="merge LoRA"):
        b.save_pretrained(str(tmp_path / "e"), load_tokenizer(tiny), None, None, state_dict=sd)
    (tmp_path / "old_export_file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        b.save_pretrained(str(tmp_path), load_tokenizer(tiny), None, None)
    sd = {"something.else": torch.zeros(1)}
    with pytest.raises(ValueError, match="outside"):
        b.save_pretrained(str(tmp_path / "e"), load_tokenizer(tiny), None, None, state_dict=sd)


FSDP_SCRIPT = r'''
import os, sys, socket, torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from sentence_transformers import SentenceTransformer
from embedcore.models.backbone import load_tokenizer
from embedcore.models.biencoder import Biencoder
tiny, out = sys.argv[1], sys.argv[2]
b = Biencoder.from_pretrained(tiny, share_encoder=False)
tok = load_tokenizer(tiny)
enc = tok(["how do I read a file", "sum"], padding=True, return_tensors="pt")
with torch.no_grad():
    ref = b.encode(enc["input_ids"], enc["attention_mask"], "passage")
for unit in b.fsdp_units():
    fully_shard(unit)
fully_shard(b)
with torch.no_grad():
    got = b.encode(enc["input_ids"], enc["attention_mask"], "passage")
assert torch.allclose(ref, got, atol=1e-6)
sd = get_model_state_dict(b, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
b.save_pretrained(out, tok, None, None, 32, state_dict=sd)
e = SentenceTransformer(out + "/passage_encoder", device="cpu").encode(["how do I read a file", "sum"], convert_to_tensor=True)
cos = torch.nn.functional.cosine_similarity(e, ref)
assert cos.min() >= 0.9999, cos
dist.destroy_process_group()
print("FSDP-EXPORT-OK")
'''


@pytest.mark.slow
def test_export_from_fsdp2_sharded_model(tiny, tmp_path):
    """1-rank gloo FSDP2 (in a subprocess, so no process group leaks into other tests)."""
    import subprocess
    import sys

    script = tmp_path / "fsdp_export.py"
    script.write_text(FSDP_SCRIPT)
    res = subprocess.run([sys.executable, str(script), tiny, str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "FSDP-EXPORT-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["avg", "weighted_avg", "cls", "last"])
def test_st_pooling_module_matches_pool_l2(pooling, side):
    """The mapping in st_export: ST's own Pooling gives pool_l2's vector, for either padding side."""
    from sentence_transformers.models import Pooling

    import embedcore
    from embedcore.models.st_export import OURS_TO_ST

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 9, 33, generator=g, dtype=torch.float64)
    lengths = [9, 5, 1, 7]
    mask = torch.zeros(4, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, 9 - n:] = 1
        else:
            mask[row, :n] = 1
    assert mask.sum(1).tolist() == lengths
    # built from the exported long-form config, exactly as sentence-transformers loads it
    long_form = {f"pooling_mode_{k}": k == OURS_TO_ST[pooling] for k in
                 ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
    import warnings

    with warnings.catch_warnings():  # ST 6.2 calls the long form deprecated (yet reads it); older ST does not
        warnings.simplefilter("ignore", FutureWarning)
        st = Pooling(33, **long_form)
    got = st({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    want = embedcore.pool_l2(hidden, mask, pooling, normalize=False, backend="torch")
    torch.testing.assert_close(got, want)

"""Per-dataset instructions (issue 17, item 5): the rule, the collator, training + validation,
the export's sentence-transformers prompts (model.encode(q, prompt_name=...) feeds what training
fed), mining and evaluation."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from corpus_fixture import write_corpus, write_topic_corpus_data
from tokenizer_fixture import bpe_tokenizer
from train_fixture import base_config, make_model, write_dataset

from embedcore.data.collator import BiencoderCollator
from embedcore.data.errors import DataError
from embedcore.data.formats import load_examples
from embedcore.data.ids import text_uid
from embedcore.data.instructions import dataset_prefixes, export_prompts, resolve_prefix
from embedcore.retrieval.model import RetrievalModel

TEMPLATE = "Instruct: {task}\nQuery:"


# ------------------------------------------------------------------------------ the rule
def test_rule_override_template_and_missing():
    assert resolve_prefix("query:", "Represent the question", "d") == "Represent the question"  # overrides
    assert resolve_prefix(TEMPLATE, "Find the docstring", "d") == "Instruct: Find the docstring\nQuery:"
    assert resolve_prefix("query:", None, "d") == "query:" and resolve_prefix("query:", "", "d") == "query:"
    assert resolve_prefix(None, None, "d") == ""
    with pytest.raises(DataError, match=r"corpus 'x'.*template with \{task\}"):
        resolve_prefix(TEMPLATE, None, "corpus 'x'")
    with pytest.raises(DataError, match="instruction must be a string"):
        resolve_prefix("q", 7, "d")


def test_dataset_prefixes_per_corpus_and_inline(tmp_path):
    a = write_topic_corpus_data(str(tmp_path), "alpha", 4, query_instruction="Find the docstring",
                                passage_instruction="Docstring:")
    b = write_topic_corpus_data(str(tmp_path), "beta", 4, seed=1)  # no instructions
    inline = write_dataset(str(tmp_path / "inline.jsonl"), 4)
    examples = load_examples([a, b, inline])
    assert [e.file_index for e in examples] == [0] * 4 + [1] * 4 + [2] * 4
    got = dataset_prefixes(examples, "query:", "passage:")
    assert got == {"alpha": ("Find the docstring", "Docstring:"), "beta": ("query:", "passage:"),
                   None: ("query:", "passage:")}
    assert dataset_prefixes(load_examples([a]), TEMPLATE, "passage:")["alpha"] == \
        ("Instruct: Find the docstring\nQuery:", "Docstring:")
    # a template with nothing to fill it: the error names the dataset
    with pytest.raises(DataError, match=r"corpus 'beta'.*query_prefix.*\{task\}"):
        dataset_prefixes(load_examples([b]), TEMPLATE, "passage:")
    with pytest.raises(DataError, match=r"inline.jsonl \(inline JSONL.*\{task\}"):
        dataset_prefixes(load_examples([inline]), TEMPLATE, "passage:")


def test_collator_uses_each_items_prefix():
    tok = bpe_tokenizer(["Instruct: find it\nQuery: open a file", "query: sort a list", "Doc: a b", "passage: c d"])

    def item(q, p, **prefixes):
        return {"query": q, "passages": [p], "passage_uids": [text_uid(p)], "qid": q, **prefixes}

    c = BiencoderCollator(tok, query_prefix="query:", passage_prefix="passage:")
    out = c([item("open a file", "a b", query_prefix="Instruct: find it\nQuery:", passage_prefix="Doc:"),
             item("sort a list", "c d")])

    def text(ids, mask):
        return tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)

    assert text(out["q_input_ids"][0], out["q_attention_mask"][0]) == "Instruct: find it\nQuery: open a file"
    assert text(out["q_input_ids"][1], out["q_attention_mask"][1]) == "query: sort a list"
    assert text(out["p_input_ids"][0], out["p_attention_mask"][0]) == "Doc: a b"
    assert text(out["p_input_ids"][1], out["p_attention_mask"][1]) == "passage: c d"


def test_export_prompts_single_and_mixed():
    assert export_prompts(None, "query:", "passage:") == ("query:", "passage:", {})
    one = {"alpha": ("Find it", "Doc:")}
    assert export_prompts(one, "query:", "passage:") == ("Find it", "Doc:", {"alpha:query": "Find it",
                                                                            "alpha:document": "Doc:"})
    mixed = {"alpha": ("Instruct: A\nQuery:", "passage:"), "beta": ("Instruct: B\nQuery:", "passage:")}
    q, p, named = export_prompts(mixed, TEMPLATE, "passage:")
    assert q is None and p == "passage:"  # an unfilled template is no prompt
    assert named == {"alpha:query": "Instruct: A\nQuery:", "alpha:document": "passage:",
                     "beta:query": "Instruct: B\nQuery:", "beta:document": "passage:"}


def test_tool_prefix_rule():
    m = RetrievalModel.__new__(RetrievalModel)
    m.path, m.query_prefix, m.passage_prefix = "M", TEMPLATE, "passage:"
    m.prompts, m.explicit_prefixes = {"alpha:query": "trained alpha", "alpha:document": ""}, (False, False)
    assert m.prefixes_for("alpha") == ("trained alpha", None)  # the model's own prompts for that corpus
    assert m.prefixes_for("alpha", ("other", "other"), True) == ("trained alpha", None)
    assert m.prefixes_for("beta", ("B", None), True) == ("Instruct: B\nQuery:", "passage:")
    assert m.prefixes_for("beta", ("B", "D"), False) == (TEMPLATE, "passage:")  # instructions off
    m.explicit_prefixes = (True, False)  # an explicit query prefix wins over the model's corpus prompt
    m.query_prefix = "q:"
    assert m.prefixes_for("alpha", ("A", None), True) == ("A", None)
    assert m.prefixes_for("alpha") == ("q:", None)
    with m.using_prefixes("x", "y"):
        assert (m.query_prefix, m.passage_prefix) == ("x", "y")
    assert (m.query_prefix, m.passage_prefix) == ("q:", "passage:")


# ------------------------------------------------------------------------------ training and export
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("instr") / "model"))


def _config(model, files, val, ckpt, query_prefix="query:", **dataset):
    data = base_config(model, files[0], val, ckpt, max_steps=3, ckpt_every_steps=0)
    data["dataloader"]["dataset"].update(data_dir_list=list(files), use_instructions=True, **dataset)
    data["dataloader"]["collate_fn"].update(query_prefix=query_prefix, q_max_len=64, p_max_len=64)
    if val is not None:
        data["validation_dataloader"]["dataset"]["use_instructions"] = True
        data["validation_dataloader"]["collate_fn"]["query_prefix"] = query_prefix
    data["checkpoint"]["save_consolidated"] = True
    return data


def _st_inputs_equal_ours(folder, prompt_name, prompt_text, batch, row, text):
    """ST's tokens for prompt_name + text are the collator's row, and the embeddings agree."""
    from sentence_transformers import SentenceTransformer

    from embedcore.models.biencoder import Biencoder

    st = SentenceTransformer(folder, device="cpu", local_files_only=True)
    assert st.prompts[prompt_name] == prompt_text
    want_ids = batch["q_input_ids"][row][batch["q_attention_mask"][row].bool()].tolist()
    got_ids = st.tokenize([st.prompts[prompt_name] + text])["input_ids"][0].tolist()
    assert got_ids == want_ids
    ours = Biencoder.from_pretrained(folder)
    with torch.no_grad():
        want = ours.encode(batch["q_input_ids"][row:row + 1], batch["q_attention_mask"][row:row + 1], "query")
    got = st.encode([text], prompt_name=prompt_name, convert_to_tensor=True)
    assert F.cosine_similarity(got.float(), want.float()).item() >= 0.9999
    bare = st.encode([text], convert_to_tensor=True)  # without the prompt: another input, the check can fail
    assert F.cosine_similarity(bare.float(), want.float()).item() < 0.9999


@pytest.mark.slow
def test_one_corpus_trains_validates_exports_and_evaluates_with_its_instructions(tmp_path, model_dir):
    from embedcore.evaluate import evaluate_model
    from embedcore.train import build, loop
    from embedcore.train.config import config_from_dict

    train = write_topic_corpus_data(str(tmp_path), "alpha", 12, query_instruction="Find the docstring:",
                                    passage_instruction="Docstring:")
    val = write_topic_corpus_data(str(tmp_path / "val"), "alpha", 5, seed=3, query_instruction="Find the docstring:",
                                  passage_instruction="Docstring:")
    data = _config(model_dir, [train], val, str(tmp_path / "run"))
    data["evaluation"] = {"data": train, "batch_size": 8}
    cfg = config_from_dict(data)
    result = loop.train(cfg)
    folder = result.export["consolidated"]
    st_cfg = json.load(open(os.path.join(folder, "config_sentence_transformers.json")))
    assert st_cfg["prompts"] == {"query": "Find the docstring: ", "document": "Docstring: ",
                                 "alpha:query": "Find the docstring: ", "alpha:document": "Docstring: "}
    # validation and training feed the instructions
    from embedcore.models.backbone import load_tokenizer

    tok = load_tokenizer(folder, padding_side="left")
    val_set = build.build_dataset(cfg, cfg.validation_dataloader, train=False)
    assert val_set[0]["query_prefix"] == "Find the docstring:" and val_set[0]["passage_prefix"] == "Docstring:"
    train_set = build.build_dataset(cfg, cfg.dataloader, train=True)
    batch = build.build_collator(cfg.dataloader, tok)([train_set[0], train_set[1]])
    assert tok.decode(batch["q_input_ids"][0][batch["q_attention_mask"][0].bool()].tolist(),
                      skip_special_tokens=True) == "Find the docstring: " + train_set[0]["query"]
    _st_inputs_equal_ours(folder, "query", "Find the docstring: ", batch, 0, train_set[0]["query"])
    # the end-of-training evaluation used the instructions: it equals an evaluation with them given explicitly
    explicit = evaluate_model(folder, train, query_prefix="Find the docstring:", passage_prefix="Docstring:")
    plain = evaluate_model(folder, train, query_prefix="query:", passage_prefix="passage:")
    for m in ("ndcg@10", "mrr@10", "recall@10"):
        assert result.evaluation[m] == pytest.approx(explicit[m], abs=1e-9)
    assert any(abs(result.evaluation[m] - plain[m]) > 1e-6 for m in ("ndcg@10", "mrr@10", "map@100"))


@pytest.mark.slow
def test_two_corpora_with_a_template_export_one_prompt_per_corpus(tmp_path, model_dir):
    from embedcore.models.backbone import load_tokenizer
    from embedcore.train import build, loop
    from embedcore.train.config import config_from_dict

    a = write_topic_corpus_data(str(tmp_path), "alpha", 8, query_instruction="Find the docstring")
    b = write_topic_corpus_data(str(tmp_path), "beta", 8, seed=1, query_instruction="Find the function")
    cfg = config_from_dict(_config(model_dir, [a, b], None, str(tmp_path / "run"), query_prefix=TEMPLATE,
                                   homogeneous_batches=True))
    result = loop.train(cfg)
    folder = result.export["consolidated"]
    prompts = json.load(open(os.path.join(folder, "config_sentence_transformers.json")))["prompts"]
    assert prompts == {"document": "passage: ", "alpha:query": "Instruct: Find the docstring\nQuery: ",
                       "alpha:document": "passage: ", "beta:query": "Instruct: Find the function\nQuery: ",
                       "beta:document": "passage: "}
    tok = load_tokenizer(folder, padding_side="left")
    train_set = build.build_dataset(cfg, cfg.dataloader, train=True)
    beta = [i for i in range(len(train_set)) if train_set.examples[i].corpus_id == "beta"][0]
    batch = build.build_collator(cfg.dataloader, tok)([train_set[beta]])
    _st_inputs_equal_ours(folder, "beta:query", "Instruct: Find the function\nQuery: ", batch, 0,
                          train_set[beta]["query"])
    loaded = RetrievalModel.load(folder, device="cpu")
    assert loaded.prefixes_for("beta") == ("Instruct: Find the function\nQuery:", "passage:")


# ------------------------------------------------------------------------------ mining and evaluation
def _toy_with_instructions(root):
    from retrieval_toy import write_corpus_id_json

    path = write_corpus_id_json(root)
    meta = os.path.join(root, "corpus_toy", "merlin_metadata.json")
    m = json.load(open(meta))
    m.update(query_instruction="Represent this question for finding facts:", passage_instruction="Fact:")
    json.dump(m, open(meta, "w"))
    return path


@pytest.mark.slow
def test_mining_applies_instructions(tmp_path, minilm_path):
    from embedcore.mine import load_mining_config, run_mining

    inp = _toy_with_instructions(str(tmp_path))

    def mine(name, *extra):
        args = ["--mining.model_name_or_path", minilm_path, "--mining.train_qa_file_path", inp,
                "--mining.train_file_output_path", str(tmp_path / f"{name}.json"),
                "--mining.hard_negatives_to_mine", "4", "--mining.mining_batch_size", "8", *extra]
        return run_mining(load_mining_config(None, args))

    used = mine("instr", "--mining.use_instructions", "true")
    explicit = mine("explicit", "--mining.query_prefix", "Represent this question for finding facts:",
                    "--mining.passage_prefix", "Fact:")
    plain = mine("plain")
    assert used["mining"]["args"]["resolved_corpus_prefixes"] == {
        "toy": ["Represent this question for finding facts:", "Fact:"]}
    assert [r["neg_doc"] for r in used["data"]] == [r["neg_doc"] for r in explicit["data"]]
    assert [r["pos_doc"] for r in used["data"]] != [r["pos_doc"] for r in plain["data"]]  # the scores moved


@pytest.mark.slow
def test_evaluation_applies_instructions_and_an_exports_corpus_prompts(tmp_path, minilm_path):
    from embedcore.evaluate import evaluate_model
    from embedcore.models.backbone import load_tokenizer
    from embedcore.models.biencoder import Biencoder
    from embedcore.models.st_export import add_prompts

    data = _toy_with_instructions(str(tmp_path))
    instr = evaluate_model(minilm_path, data, use_instructions=True)
    explicit = evaluate_model(minilm_path, data, query_prefix="Represent this question for finding facts:",
                              passage_prefix="Fact:")
    plain = evaluate_model(minilm_path, data)
    keys = ("ndcg@10", "mrr@10", "recall@10", "map@100")
    assert all(instr[k] == pytest.approx(explicit[k], abs=1e-9) for k in keys)
    assert any(abs(instr[k] - plain[k]) > 1e-6 for k in keys)
    # an export that records a corpus prompt is evaluated with it, without being asked
    out = str(tmp_path / "export")
    Biencoder.from_pretrained(minilm_path).save_pretrained(out, load_tokenizer(minilm_path))
    add_prompts(out, {"toy:query": "Represent this question for finding facts:", "toy:document": "Fact:"})
    own = evaluate_model(out, data)
    assert all(own[k] == pytest.approx(explicit[k], abs=1e-9) for k in keys)


def test_corpus_metadata_with_a_bad_instruction_is_an_error(tmp_path):
    folder = write_corpus(str(tmp_path / "c"), "c", {"d0": "x"}, query_instruction=["not", "a", "string"])
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"corpus": [{"path": "c"}], "data": [
        {"question_id": "q", "question": "q", "corpus_id": "c", "pos_doc": ["d0"]}]}))
    assert os.path.isdir(folder)
    with pytest.raises(DataError, match="instruction must be a string"):
        dataset_prefixes(load_examples([str(path)]), "query:", "passage:")

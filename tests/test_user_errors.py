"""Every user error of the three command lines is one line on stderr, exit code 2, no traceback.

Each case runs the real command-line entry point (`main(argv)` in-process, which is what
`python train.py` / `python -m embedcore.mine` / `python -m embedcore.evaluate` call; a few cases
also as real subprocesses) and asserts the exit code, the absence of a traceback, that stderr is
one line and that it names the file:line, the dotted key or the path.
"""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from train_fixture import base_config, make_model, write_beir, write_dataset

from embedcore.evaluate import main as evaluate_main
from embedcore.mine import main as mine_main
from embedcore.train.cli import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    return root, make_model(str(root / "model")), write_dataset(str(root / "train.jsonl"), 8)


def write_config(root, data, name="cfg.json") -> str:
    path = root / name
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def assert_one_line_error(capsys, rc, *fragments):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "error:" in ln]
    assert rc == 2, f"exit code {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, f"expected one error line, got:\n{err[-3000:]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def train_with(root, model, train, capsys, tag, mutate=None, extra=(), **steps):
    data = base_config(model, train, None, str(root / f"ck_{tag}"), **steps)
    if mutate:
        mutate(data)
    return train_main([write_config(root, data, f"cfg_{tag}.json"), *extra])  # not "{tag}.json": a data file may have that name


# ------------------------------------------------------------------ config values and keys
@pytest.mark.parametrize("extra, fragment", [
    (["--optimizer.lr", "inf"], "optimizer.lr: must be a finite number, got inf"),
    (["--temperature", "nan"], "temperature: must be a finite number, got nan"),
    (["--optimizer.betas", "[0.9, .inf]"], "optimizer.betas[1]: must be a finite number"),
    (["--lr_scheduler.min_lr", "-1"], "lr_scheduler.min_lr"),
    (["--dataloader.collate_fn.p_max_len", "0"], "dataloader.collate_fn.p_max_len: must be > 0"),
    (["--optimizer.nope", "1"], "optimizer.nope"),
    (["--step_scheduler.local_batch_size", "three"], "step_scheduler.local_batch_size: expected an integer"),
    (["--step_scheduler.global_batch_size", "6", "--step_scheduler.local_batch_size", "4"],
     "step_scheduler.global_batch_size: 6 is not a multiple of step_scheduler.local_batch_size 4"),
    (["--dataloader.batch_size", "3"], "dataloader.batch_size: 3 differs from step_scheduler.local_batch_size 2"),
    (["--divergence.loss_spike_factor", "0.5"], "divergence.loss_spike_factor: must be > 1"),
])
def test_config_values_are_checked_before_work_starts(env, capsys, extra, fragment):
    root, model, train = env
    rc = train_with(root, model, train, capsys, "cfg", extra=extra)
    assert_one_line_error(capsys, rc, fragment)
    assert not os.path.exists(root / "ck_cfg" / "LATEST")


def test_missing_and_malformed_config_files(env, capsys, tmp_path):
    assert_one_line_error(capsys, train_main([str(tmp_path / "nope.yaml")]), "config file not found", "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("step_scheduler: [unclosed\n")
    assert_one_line_error(capsys, train_main([str(bad)]), "bad.yaml: not valid YAML")


def test_batch_larger_than_the_data(env, capsys):
    root, model, train = env
    rc = train_with(root, model, train, capsys, "big", global_batch_size=16, local_batch_size=16)
    assert_one_line_error(capsys, rc, "step_scheduler.global_batch_size: 16 is larger than the training set (8")


# ------------------------------------------------------------------ data
def _data_case(root, name: str, content: bytes) -> str:
    path = root / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("name, content, fragment", [
    ("malformed.jsonl", b'{"query": "q", "pos_doc": "p", "neg_doc": ["n"]}\n{"query": "q2", "pos_doc": \n',
     "malformed.jsonl:2: malformed JSON line"),
    ("list.jsonl", b'{"query": "q", "pos_doc": "p", "neg_doc": ["n"]}\n[1, 2]\n', "list.jsonl:2: expected a JSON object"),
    ("noquery.jsonl", b'{"query": "q", "pos_doc": "p", "neg_doc": ["n"]}\n{"pos_doc": "p"}\n', "noquery.jsonl:2: missing query"),
    ("nopos.jsonl", b'{"query": "q", "pos_doc": "", "neg_doc": ["n"]}\n', "nopos.jsonl:1: pos_doc[0]"),
    ("latin1.jsonl", b'{"query": "q", "pos_doc": "p", "neg_doc": ["n"]}\n{"query": "caf\xe9", "pos_doc": "p"}\n',
     "latin1.jsonl:2: not valid UTF-8 (byte offset 63"),  # 49 bytes of line 1 + 14
])
def test_bad_training_data_names_file_and_line(env, capsys, name, content, fragment):
    root, model, _ = env
    path = _data_case(root, name, content)
    rc = train_with(root, model, path, capsys, "data")
    assert_one_line_error(capsys, rc, fragment)


def _corpus_dir(root, name, metadata=True):
    folder = root / name
    folder.mkdir(exist_ok=True)
    if metadata:
        (folder / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": name}))
    (folder / "train.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(4)))
    return folder


def test_corpus_id_data_errors(env, capsys):
    root, model, _ = env
    _corpus_dir(root, "wiki")
    doc = {"corpus": [{"path": "wiki"}],
           "data": [{"question_id": "a", "question": "q", "corpus_id": "wiki", "pos_doc": ["d0"], "neg_doc": ["d1"]},
                    {"question_id": "b", "question": "q", "corpus_id": "wiki", "pos_doc": ["d9"], "neg_doc": ["d1"]}]}
    (root / "ids.json").write_text(json.dumps(doc))
    rc = train_with(root, model, str(root / "ids.json"), capsys, "ids")
    assert_one_line_error(capsys, rc, "ids.json: data[1]", "pos_doc id 'd9' is not in corpus 'wiki'")
    doc["data"][1]["corpus_id"] = "nope"
    (root / "cid.json").write_text(json.dumps(doc))
    rc = train_with(root, model, str(root / "cid.json"), capsys, "cid")
    assert_one_line_error(capsys, rc, "cid.json: data[1]", "unknown corpus id 'nope'")
    _corpus_dir(root, "bare", metadata=False)
    (root / "meta.json").write_text(json.dumps({"corpus": [{"path": "bare"}], "data": doc["data"][:1]}))
    rc = train_with(root, model, str(root / "meta.json"), capsys, "meta")
    assert_one_line_error(capsys, rc, "meta.json: corpus[0]", "no merlin_metadata.json")


def test_missing_files_and_directories_in_the_wrong_place(env, capsys):
    root, model, _ = env
    rc = train_with(root, model, str(root / "absent.jsonl"), capsys, "absent")
    assert_one_line_error(capsys, rc, "absent.jsonl: data file not found")
    (root / "adir.jsonl").mkdir(exist_ok=True)
    rc = train_with(root, model, str(root / "adir.jsonl"), capsys, "adir")
    assert_one_line_error(capsys, rc, "adir.jsonl: is a directory")


# ------------------------------------------------------------------ models, checkpoints, outputs
def test_missing_model_folder_and_folder_without_config(env, capsys, tmp_path):
    root, _, train = env
    rc = train_with(root, str(tmp_path / "no_model"), train, capsys, "nomodel")
    assert_one_line_error(capsys, rc, "no_model", "does not exist")
    (tmp_path / "empty_model").mkdir()
    rc = train_with(root, str(tmp_path / "empty_model"), train, capsys, "emptymodel")
    assert_one_line_error(capsys, rc, "empty_model", "no config.json")


def test_pickled_weights_are_refused_by_the_safe_loader(env, capsys, tmp_path):
    from transformers import AutoModel

    root, model, train = env
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    # transformers 5 writes safetensors whatever save_pretrained is told: pickle the weights by hand.
    torch.save(AutoModel.from_pretrained(model).state_dict(), pickled / "pytorch_model.bin")
    for name in os.listdir(model):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "config.json"):
            (pickled / name).write_bytes(open(os.path.join(model, name), "rb").read())
    assert not any(n.endswith(".safetensors") for n in os.listdir(pickled))
    rc = train_with(root, str(pickled), train, capsys, "pickled")
    assert_one_line_error(capsys, rc, str(pickled), "safetensors only")


def test_model_that_needs_remote_code_is_refused(env, capsys, tmp_path):
    root, model, train = env
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads(open(os.path.join(model, "config.json")).read())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    rc = train_with(root, str(remote), train, capsys, "remote")
    assert_one_line_error(capsys, rc, str(remote), "remote code")


def test_missing_checkpoint_to_restore(env, capsys, tmp_path):
    root, model, train = env
    rc = train_with(root, model, train, capsys, "restore", extra=["--checkpoint.restore_from", str(tmp_path / "step_9")])
    assert_one_line_error(capsys, rc, "checkpoint.restore_from", "step_9", "does not exist")


def test_output_path_that_cannot_be_written(env, capsys, tmp_path):
    root, model, train = env
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = train_with(root, model, train, capsys, "out", extra=["--checkpoint.checkpoint_dir", str(blocker / "ck")])
    assert_one_line_error(capsys, rc, str(blocker / "ck"))


def test_disk_full_while_saving_is_one_line(env, capsys, monkeypatch):
    from embedcore.train import checkpoint

    root, model, train = env

    def full_disk(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    rc = train_with(root, model, train, capsys, "full", ckpt_every_steps=1)
    line = assert_one_line_error(capsys, rc, "no space left on the device", ".safetensors")
    assert str(root / "ck_full") in line
    assert not os.path.exists(root / "ck_full" / "LATEST")


def test_debug_shows_the_traceback(env, capsys):
    root, model, train = env
    rc = train_with(root, model, train, capsys, "debug", extra=["--optimizer.lr", "inf", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "optimizer.lr: must be a finite number" in err


# ------------------------------------------------------------------ mining and evaluation
def test_mine_errors(env, capsys, tmp_path, minilm_path):
    root, _, train = env
    base = ["--mining.model_name_or_path", minilm_path, "--mining.train_file_output_path", str(tmp_path / "o.json")]
    bad = _data_case(tmp_path, "bad.jsonl", b'{"query": "q", "pos_doc": "p"}\n\xff\xfe\n')
    assert_one_line_error(capsys, mine_main([*base, "--mining.train_qa_file_path", bad,
                                             "--mining.corpus_path", str(_corpus_dir(tmp_path, "c"))]),
                          "bad.jsonl:2: not valid UTF-8")
    assert_one_line_error(capsys, mine_main([*base, "--mining.train_qa_file_path", train, "--mining.hard_neg_margin",
                                             "nan"]), "mining.hard_neg_margin: must be a finite number")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = mine_main(["--mining.model_name_or_path", minilm_path, "--mining.train_qa_file_path", train,
                    "--mining.corpus_path", str(tmp_path / "c"), "--mining.train_file_output_path", str(blocker / "o.json")])
    assert_one_line_error(capsys, rc, str(blocker / "o.json"))
    rc = mine_main(["--mining.model_name_or_path", str(tmp_path / "nomodel"), "--mining.train_qa_file_path", train,
                    "--mining.corpus_path", str(tmp_path / "c"), "--mining.train_file_output_path", str(tmp_path / "o.json")])
    assert_one_line_error(capsys, rc, "mining.model_name_or_path", "nomodel")


def test_evaluate_errors_and_silent_zeros(env, capsys, tmp_path, minilm_path, caplog):
    beir = write_beir(str(tmp_path / "beir"))
    out = str(tmp_path / "m.json")
    args = ["--model", minilm_path, "--output", out]
    assert_one_line_error(capsys, evaluate_main([*args, "--data", str(tmp_path / "nope")]), "nope", "not found")
    assert_one_line_error(capsys, evaluate_main([*args, "--data", beir, "--metrics", "ndcg@x"]), "--metrics")
    # qrels that name no existing document: an error, not nDCG 0.0000
    with open(os.path.join(beir, "qrels", "typo.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\nq0\tnot-a-doc\t1\nq1\talso-not\t1\n")
    rc = evaluate_main([*args, "--data", beir, "--split", "typo"])
    assert_one_line_error(capsys, rc, "typo.tsv", "no qrels pair", "2 unknown document ids")
    assert not os.path.exists(out)
    # some unknown ids: evaluated on the rest, with a warning that counts them and names examples
    with open(os.path.join(beir, "qrels", "test.tsv"), "a") as f:
        f.write("q0\tghost-doc\t1\nq-ghost\tfile-0\t1\n")
    with caplog.at_level("WARNING"):
        assert evaluate_main([*args, "--data", beir]) == 0
    warned = caplog.text
    assert "1 qrels documents are not in corpus.jsonl" in warned and "'ghost-doc'" in warned
    assert "1 qrels queries are not in queries.jsonl" in warned and "'q-ghost'" in warned
    assert json.loads(open(out).read())["ndcg@10"] > 0
    with open(os.path.join(beir, "queries.jsonl"), "ab") as f:
        f.write(b'{"_id": "qx", "text": "\xc3("}\n')
    rc = evaluate_main([*args, "--data", beir])
    assert_one_line_error(capsys, rc, "queries.jsonl:13: not valid UTF-8")


# ------------------------------------------------------------------ real processes
@pytest.mark.parametrize("cli", ["train.py", "embedcore.mine", "embedcore.evaluate"])
def test_real_process_prints_one_line_and_exits_2(env, tmp_path, cli):
    root, model, _ = env
    bad = _data_case(tmp_path, "bad.jsonl", b'{"query": "q", "pos_doc": "p", "neg_doc": ["n"]}\n{"query": \n')
    if cli == "train.py":
        cmd = ["train.py", write_config(tmp_path, base_config(model, bad, None, str(tmp_path / "ck")))]
    elif cli == "embedcore.mine":
        cmd = ["-m", cli, "--mining.model_name_or_path", model, "--mining.train_qa_file_path", bad,
               "--mining.train_file_output_path", str(tmp_path / "o.json")]
    else:
        cmd = ["-m", cli, "--model", model, "--data", bad, "--output", str(tmp_path / "m.json")]
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"{cli}: error: {bad}:2: malformed JSON line: Expecting value (column 11)"], proc.stderr[-3000:]


def test_an_internal_bug_keeps_its_traceback(env, capsys, monkeypatch):
    from embedcore.train import loop

    root, model, train = env

    def bug(*a, **k):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(loop.Trainer, "run", bug)
    with pytest.raises(KeyError):
        train_with(root, model, train, capsys, "bug")
    assert torch.is_tensor(torch.zeros(1))

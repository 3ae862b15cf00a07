"""The trainer with the options of issues 15 and 17, end to end on the tiny local Llama:
cached (GradCache) encoding and activation checkpointing train to the weights of the plain step,
each `loss:` term trains and changes the run, the false-negative filter's count reaches the log,
score distillation reads teacher scores from the data (and a missing one is an error naming the
file and line), and a Matryoshka export records its prefixes for sentence-transformers'
truncate_dim."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from train_fixture import base_config, make_model, write_dataset

from embedcore.errors import DataError
from embedcore.train import loop as loop_mod
from embedcore.train.config import config_from_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    model = make_model(str(root / "model"))
    train = _varied_lengths(write_dataset(str(root / "train.jsonl"), 16))
    val = write_dataset(str(root / "val.jsonl"), 5, seed=1)
    return root, model, train, val


def _varied_lengths(path):
    """Passages of 1 to 6 words: the collator pads to the longest, padding-aware chunks need not."""
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            cut = lambda text, k: " ".join(text.split()[:1 + (i + k) % 6])  # noqa: E731
            f.write(json.dumps({**r, "pos_doc": cut(r["pos_doc"], 0),
                                "neg_doc": [cut(n, k + 1) for k, n in enumerate(r["neg_doc"])]}) + "\n")
    return path


def _run(root, model, train_file, name, val=None, **sections):
    data = base_config(model, train_file, val, str(root / name), max_steps=2, ckpt_every_steps=2)
    data["dataloader"]["collate_fn"].update(q_max_len=64, p_max_len=64)  # no truncation: lengths vary
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return loop_mod.train(config_from_dict(data))


def _weights(result):
    return load_file(os.path.join(result.checkpoint, "model", "model.safetensors"))


def _records(result):
    with open(os.path.join(os.path.dirname(result.checkpoint), "training.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def plain(setup):
    root, model, train, _ = setup
    return _run(root, model, train, "plain")


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"train": {"grad_cache": {"chunk_size": 3}}},
    {"train": {"grad_cache": {"chunk_size": 8}}, "distributed": {"activation_checkpointing": True}},
    {"distributed": {"activation_checkpointing": True}},
], ids=["cached", "cached+ac", "ac"])
def test_cached_encoding_and_activation_checkpointing_train_like_the_plain_step(setup, plain, options):
    """No dropout in the tiny model: the same gradients up to rounding, so the same weights."""
    root, model, train, _ = setup
    result = _run(root, model, train, "_".join(options) + str(len(str(options))), **options)
    want, got = _weights(plain), _weights(result)
    init = load_file(os.path.join(model, "model.safetensors"))
    moved = [k for k, v in got.items() if not torch.equal(v, init[k.split(".", 1)[1]])]
    assert moved, "training must have moved the weights (else equal weights prove nothing)"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-5, msg=k)
    recs = _records(result)
    if "train" in options:  # padding-aware chunks encode fewer padded tokens than the collated batch
        plain_recs = _records(plain)
        assert recs[-1]["padded_tokens_per_s"] / recs[-1]["tokens_per_s"] < \
            plain_recs[-1]["padded_tokens_per_s"] / plain_recs[-1]["tokens_per_s"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", [
    {"symmetric_weight": 1.0},
    {"matryoshka_dims": [32, 16, 8], "matryoshka_weights": [1.0, 0.5, 0.5]},
    {"false_negative_margin": 0.5},
])
def test_each_loss_term_trains_and_changes_the_run(setup, plain, loss):
    root, model, train, _ = setup
    result = _run(root, model, train, "loss_" + "_".join(loss), loss=loss)
    assert math.isfinite(result.last_loss) and result.last_loss != pytest.approx(plain.last_loss)
    recs = _records(result)
    if "false_negative_margin" in loss:  # the filter's count is logged, and with a low margin it masks
        assert all("fn_masked" in r for r in recs) and sum(r["fn_masked"] for r in recs) > 0
    else:
        assert not any("fn_masked" in r for r in recs)


def _scored(src, dst, drop_one=False):
    rows = [json.loads(line) for line in open(src)]
    with open(dst, "w") as f:
        for i, r in enumerate(rows):
            pos = {"text": r["pos_doc"], "score": 10.0}
            negs = [{"text": n, "score": float(k)} for k, n in enumerate(r["neg_doc"])]
            if drop_one and i == 3:
                del negs[1]["score"]
            f.write(json.dumps({**r, "pos_doc": [pos], "neg_doc": negs}) + "\n")
    return str(dst)


@pytest.mark.slow
def test_distillation_reads_teacher_scores_and_a_missing_one_names_the_line(setup, plain):
    root, model, train, _ = setup
    scored = _scored(train, root / "scored.jsonl")
    data_list = {"dataset": {"data_dir_list": [scored]}}
    result = _run(root, model, train, "distill", loss={"distill_weight": 1.0, "distill_temperature": 2.0},
                  dataloader=data_list)
    undistilled = _run(root, model, train, "scored_plain", dataloader=data_list)
    assert math.isfinite(result.last_loss) and result.last_loss > undistilled.last_loss  # the KL term adds
    broken = _scored(train, root / "broken.jsonl", drop_one=True)
    with pytest.raises(DataError, match=r"broken\.jsonl:4: loss\.distill_weight needs a teacher \"score\".*"
                                        r"neg_doc\[1\] has none"):
        _run(root, model, train, "distill_broken", loss={"distill_weight": 1.0},
             dataloader={"dataset": {"data_dir_list": [broken]}})


@pytest.mark.slow
def test_matryoshka_export_records_its_prefixes_for_truncate_dim(setup):
    root, model, train, _ = setup
    result = _run(root, model, train, "matryoshka_export", loss={"matryoshka_dims": [32, 8]},
                  checkpoint={"save_consolidated": True})
    folder = result.export["consolidated"]
    settings = json.load(open(os.path.join(folder, "embedcore_biencoder.json")))
    assert settings["matryoshka_dims"] == [32, 8]
    from sentence_transformers import SentenceTransformer

    full = SentenceTransformer(folder, device="cpu").encode(["open a file"], convert_to_tensor=True)
    small = SentenceTransformer(folder, device="cpu", truncate_dim=8).encode(["open a file"], convert_to_tensor=True)
    assert small.shape[-1] == 8 and torch.allclose(small, full[..., :8], atol=1e-6)

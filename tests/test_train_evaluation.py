"""Retrieval evaluation at the end of training (the `evaluation:` config section): the metrics
of embedcore.evaluate on the final export appear in the log and in validation.jsonl, equal to
evaluating the export directly (two ranks: tests/test_train_distributed.py); bad sections are config errors naming the key, and missing
data fails before training."""
import json
import os
import re

import pytest

from train_fixture import base_config, make_model, write_beir, write_dataset

from embedcore.train import config as C
from embedcore.train import loop as loop_mod

METRICS = ["ndcg@10", "mrr@10", "recall@5"]
EVAL_LINE = re.compile(r"^step 3 \| epoch 0 \| eval ndcg@10 \d\.\d{4} \| mrr@10 \d\.\d{4} \| recall@5 \d\.\d{4} \| "
                       r"queries 12 \| corpus 18$")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eval")
    model = make_model(str(root / "model"))
    train = write_dataset(str(root / "train.jsonl"), 12)
    val = write_dataset(str(root / "val.jsonl"), 5, seed=1)
    beir = write_beir(str(root / "beir"))
    return root, model, train, val, beir


def _config(root, model, train, val, beir, name, **evaluation):
    data = base_config(model, train, val, str(root / name), max_steps=3)
    data["checkpoint"]["save_consolidated"] = True
    data["evaluation"] = {"data": beir, "metrics": METRICS, "batch_size": 5, **evaluation}
    return data


def test_end_of_training_evaluation_in_log_and_validation_jsonl(setup, caplog):
    root, model, train, val, beir = setup
    caplog.set_level("INFO")
    result = loop_mod.train(C.config_from_dict(_config(root, model, train, val, beir, "run")))
    assert result.step == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "root" and " | eval " in r.getMessage()]
    assert len(lines) == 1 and EVAL_LINE.match(lines[0]), lines
    with open(root / "run" / "validation.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    # the end-of-run validation first (val_every_steps 0), then the retrieval evaluation
    assert [("val_mrr" in r, "ndcg@10" in r) for r in records] == [(True, False), (False, True)]
    rec = records[-1]
    assert rec["step"] == 3 and rec["epoch"] == 0 and rec["split"] == "test" and rec["data"] == beir
    assert rec["model"] == result.export["consolidated"] and rec["num_queries"] == 12 and rec["num_corpus"] == 18
    assert rec == result.evaluation
    # the same numbers as `python -m embedcore.evaluate --model <export> --data <beir>`
    from embedcore.evaluate import evaluate_model

    direct = evaluate_model(result.export["consolidated"], beir, "test", metrics=METRICS, batch_size=5)
    for key in METRICS + ["num_queries", "num_corpus"]:
        assert rec[key] == direct[key], key
    assert all(0 < rec[m] <= 1 for m in METRICS)
    # the log line shows the recorded values
    assert f"ndcg@10 {rec['ndcg@10']:.4f} | mrr@10 {rec['mrr@10']:.4f}" in lines[0]


def test_resuming_a_finished_run_does_not_evaluate_again(setup):
    root, model, train, val, beir = setup
    data = _config(root, model, train, val, beir, "run_twice")
    first = loop_mod.train(C.config_from_dict(data))
    data = _config(root, model, train, val, beir, "run_twice")
    data["checkpoint"]["restore_from"] = "LATEST"
    again = loop_mod.train(C.config_from_dict(data))
    assert again.step == first.step == 3 and again.evaluation is None
    assert os.path.isdir(again.export["consolidated"])
    with open(root / "run_twice" / "validation.jsonl") as f:
        evals = [r for r in map(json.loads, filter(str.strip, f)) if "ndcg@10" in r]
    assert len(evals) == 1


def test_split_and_max_length_reach_evaluate(setup):
    root, model, train, _, beir = setup
    data = _config(root, model, train, None, beir, "run_dev", split="dev", max_length=4)
    result = loop_mod.train(C.config_from_dict(data))
    from embedcore.evaluate import evaluate_model

    direct = evaluate_model(result.export["consolidated"], beir, "dev", metrics=METRICS, batch_size=5, max_length=4)
    assert result.evaluation["split"] == "dev" and result.evaluation["num_queries"] == 6
    for key in METRICS:
        assert result.evaluation[key] == direct[key], key
    with open(root / "run_dev" / "validation.jsonl") as f:
        assert [json.loads(line)["split"] for line in f] == ["dev"]  # no validation set: the evaluation only


def test_missing_evaluation_data_fails_before_training(setup):
    root, model, train, _, beir = setup
    data = _config(root, model, train, None, str(root / "nowhere"), "run_missing")
    with pytest.raises(C.ConfigError, match="evaluation.data: .*nowhere.* not found"):
        loop_mod.train(C.config_from_dict(data))
    assert not os.path.exists(root / "run_missing" / "training.jsonl")
    data = _config(root, model, train, None, beir, "run_missing", split="train")
    with pytest.raises(C.ConfigError, match=r"evaluation.split: .* no qrels/train.tsv"):
        loop_mod.train(C.config_from_dict(data))


@pytest.mark.parametrize("change, match", [
    (lambda d: d["evaluation"].pop("data"), "evaluation.data: required"),
    (lambda d: d["evaluation"].update(metrics=["ndcg@10", "ndcg10"]), r"evaluation.metrics\[1\]: 'ndcg10'"),
    (lambda d: d["evaluation"].update(metrics=[]), "evaluation.metrics: at least one"),
    (lambda d: d["evaluation"].update(batch_size=0), "evaluation.batch_size: must be > 0"),
    (lambda d: d["evaluation"].update(max_length=-1), "evaluation.max_length: must be > 0"),
    (lambda d: d["evaluation"].update(dtype="int8"), "evaluation.dtype: expected one of"),
    (lambda d: d["evaluation"].update(corpus="x"), "evaluation.corpus: unknown key"),
    (lambda d: d["checkpoint"].update(save_consolidated=False), "checkpoint.save_consolidated"),
    (lambda d: d.update(peft={"target_modules": ["q_proj"]}), "checkpoint.export_merged_lora"),
    (lambda d: d["model"].update(pooling="colbert"), "colbert"),
], ids=["no_data", "bad_metric", "no_metrics", "batch_size", "max_length", "dtype", "unknown_key",
        "no_export", "lora_no_merge", "colbert"])
def test_bad_evaluation_sections_name_the_key(change, match):
    data = base_config("m", "t.jsonl", None, "out")
    data["checkpoint"]["save_consolidated"] = True
    data["evaluation"] = {"data": "beir"}
    change(data)
    with pytest.raises(C.ConfigError, match=match):
        C.config_from_dict(data)


def test_defaults_and_override():
    from embedcore.retrieval.metrics import DEFAULT_METRICS

    assert tuple(C.EvaluationConfig().metrics) == C.DEFAULT_EVAL_METRICS == tuple(DEFAULT_METRICS)
    data = base_config("m", "t.jsonl", None, "out")
    data["checkpoint"]["save_consolidated"] = True
    C.apply_overrides(data, ["--evaluation.data", "some/beir", "--evaluation.split=dev"])
    cfg = C.config_from_dict(data)
    assert cfg.evaluation.data == "some/beir" and cfg.evaluation.split == "dev" and cfg.evaluation.batch_size == 128
    assert C.config_from_dict(base_config("m", "t.jsonl", None, "out")).evaluation is None

"""The trainer end to end in one process (tiny Llama, a handful of steps), plus its pieces:
schedule, MaxSim, masked cross-entropy, the CLI's error path, NaN handling."""
import json
import math
import os
import re

import pytest
import torch
import yaml

from train_fixture import base_config, make_model, write_dataset

from embedcore.train import loop as loop_mod
from embedcore.train.config import LRSchedulerConfig, accumulation_steps, config_from_dict
from embedcore.train import objective as objective_mod
from embedcore.train.optim import WarmupDecaySchedule

TRAIN_LINE = re.compile(r"^step \d+ \| epoch \d+ \| loss \d+\.\d{4} \| grad_norm \d+\.\d{4} \| lr \d\.\d{2}e[-+]\d{2} \| "
                        r"mem \d+\.\d{2} GiB \| time \d+\.\d{2}s \| tokens/s \d+ \| padded tokens/s \d+$")
VAL_LINE = re.compile(r"^step \d+ \| epoch \d+ \| val_loss \d+\.\d{4} \| val_acc1 \d\.\d{4} \| val_mrr \d\.\d{4}$")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = make_model(str(root / "model"))
    train = write_dataset(str(root / "train.jsonl"), 24)
    val = write_dataset(str(root / "val.jsonl"), 7, seed=1)
    return root, model, train, val


def test_schedule_warmup_then_cosine_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupDecaySchedule(opt, LRSchedulerConfig(lr_warmup_steps=4, lr_decay_style="cosine", min_lr=0.1), 2.0, 14)
    lrs = [sched.lr_at(s) for s in range(14)]
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4] == pytest.approx(2.0) and lrs[-1] > 0.1 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert sched.lr_at(14) == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    other = WarmupDecaySchedule(opt, LRSchedulerConfig(lr_warmup_steps=4), 2.0, 14)
    other.load_state_dict(sched.state_dict())
    assert other.current_lr == sched.current_lr


def test_cli_reports_config_errors_naming_the_key(tmp_path, capsys):
    from embedcore.train.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"pretrained_model_name_or_path": "m"},
                                    "dataloader": {"dataset": {"data_dir_list": ["a"]}}}))
    assert main([str(path), "--optimizer.learning_rate", "1"]) == 2
    assert "optimizer.learning_rate" in capsys.readouterr().err


def test_global_batch_must_divide(setup):
    root, model, train, _ = setup
    with pytest.raises(ValueError, match="global_batch_size: 6 is not a multiple of step_scheduler.local_batch_size 4"):
        config_from_dict(base_config(model, train, None, str(root / "x"), global_batch_size=6, local_batch_size=4))
    cfg = config_from_dict(base_config(model, train, None, str(root / "x"), global_batch_size=8, local_batch_size=4))
    with pytest.raises(ValueError, match="global_batch_size: 8 is not a multiple of local_batch_size 4 x 3 rank"):
        accumulation_steps(cfg, 3)
    assert loop_mod.steps_per_epoch(24, 2, 1, 2) == 6 and loop_mod.steps_per_epoch(25, 2, 2, 2) == 3


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_few_steps_log_checkpoint_and_export(setup, caplog):
    root, model, train, val = setup
    ckpt = str(root / "run_a")
    data = base_config(model, train, val, ckpt, max_steps=4, val_every_steps=2, ckpt_every_steps=2)
    data["checkpoint"]["save_consolidated"] = True
    caplog.set_level("INFO")
    result = loop_mod.train(config_from_dict(data))
    assert result.step == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "root"]
    assert sum(bool(TRAIN_LINE.match(m)) for m in lines) == 4, lines
    assert sum(bool(VAL_LINE.match(m)) for m in lines) == 2, lines
    recs = _records(os.path.join(ckpt, "training.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in recs)
    vals = _records(os.path.join(ckpt, "validation.jsonl"))
    assert [v["step"] for v in vals] == [2, 4] and all(v["val_queries"] == 7 for v in vals)
    assert all(0 < v["val_mrr"] <= 1 and 0 <= v["val_acc1"] <= 1 for v in vals)
    assert open(os.path.join(ckpt, "LATEST")).read().strip() == "step_4"
    assert sorted(d for d in os.listdir(ckpt) if d.startswith(("step_", ".tmp"))) == ["step_2", "step_4"]
    state = json.load(open(os.path.join(ckpt, "step_4", "state.json")))
    assert state["step"] == 4 and state["scheduler"]["step_count"] == 4
    # the export loads in sentence-transformers and embeds like our model
    from sentence_transformers import SentenceTransformer

    from embedcore.models.biencoder import Biencoder
    from embedcore.models.backbone import load_tokenizer

    folder = result.export["consolidated"]
    st = SentenceTransformer(folder, device="cpu")
    texts = ["open a file path", "sine cosine and square root of an integer number"]
    ours = Biencoder.from_pretrained(folder)
    tok = load_tokenizer(folder, padding_side=ours.padding_side)
    from embedcore.data.collator import encode_texts

    enc = encode_texts(tok, texts, 16, "passage:")
    with torch.no_grad():
        want = ours.encode(enc["input_ids"], enc["attention_mask"], "passage")
    got = torch.as_tensor(st.encode(texts, prompt_name="document", convert_to_tensor=True))
    cos = torch.nn.functional.cosine_similarity(got.float(), want.float(), dim=-1)
    assert (cos >= 0.9999).all(), cos


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    root, model, train, _ = setup
    ckpt = str(root / "run_nan")
    calls = {"n": 0}
    real = objective_mod.PooledObjective.train_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # step 3 (2 micro-batches per step)

    monkeypatch.setattr(objective_mod.PooledObjective, "train_loss", poisoned)
    data = base_config(model, train, None, ckpt, max_steps=6, ckpt_every_steps=2, log_every_steps=3)
    with pytest.raises(loop_mod.TrainingDiverged, match=r"NaN or inf at step 3.*step_2"):
        loop_mod.train(config_from_dict(data))
    assert open(os.path.join(ckpt, "LATEST")).read().strip() == "step_2"
    assert not os.path.exists(os.path.join(ckpt, "step_4"))
    from safetensors.torch import load_file

    weights = load_file(os.path.join(ckpt, "step_2", "model", "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_colbert_trains_with_maxsim(setup):
    root, model, train, val = setup
    data = base_config(model, train, val, str(root / "run_colbert"), max_steps=2, val_every_steps=2)
    data["model"]["pooling"] = "colbert"
    result = loop_mod.train(config_from_dict(data))
    assert result.step == 2 and math.isfinite(result.last_loss)
    assert 0 < result.validations[-1]["val_mrr"] <= 1


@pytest.mark.slow
def test_lora_run_saves_adapter_and_merged_export(setup):
    root, model, train, _ = setup
    data = base_config(model, train, None, str(root / "run_lora"), max_steps=2)
    data["peft"] = {"target_modules": ["q_proj", "v_proj"], "dim": 4, "alpha": 8, "dropout": 0.0}
    data["checkpoint"].update(save_consolidated=True, export_merged_lora=True)
    result = loop_mod.train(config_from_dict(data))
    adapter, merged = result.export["adapter"], result.export["consolidated"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    assert "adapter_config.json" not in os.listdir(merged) and "modules.json" in os.listdir(merged)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(result.checkpoint, "model", "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # LoRA checkpoints hold the trainable tensors only
    adapter_weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.layers.0.self_attn.q_proj.lora_A") for k in adapter_weights)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter_weights.items() if "lora_B" in k)  # B moved off zero
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(merged, device="cpu").encode(["open a file"], prompt_name="query")
    assert emb.shape == (1, 32)


@pytest.mark.slow
def test_reference_config_runs_on_cpu_with_only_paths_changed(setup, caplog):
    """The guide's full config (nccl, FusedAdam, liger, SDPA patching, bf16, global batch 128) runs
    on this CPU machine: only model/data paths change (plus max_steps and the output folder to keep
    the test short); each GPU-only setting gives a one-line notice."""
    root, model, _, _ = setup
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = os.path.join(here, "examples", "data", "stdlib_train.jsonl")
    from embedcore.train.config import load_config

    cfg = load_config(os.path.join(here, "examples", "reference_llama3_2_1b.yaml"), [
        "--model.pretrained_model_name_or_path", model, "--tokenizer.pretrained_model_name_or_path", model,
        "--dataloader.dataset.data_dir_list", data, "--step_scheduler.max_steps", "1",
        "--checkpoint.checkpoint_dir", str(root / "run_reference")])
    caplog.set_level("INFO")
    result = loop_mod.train(cfg)
    assert result.step == 1 and math.isfinite(result.last_loss)
    notices = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for key in ("model.use_liger_kernel", "model.use_sdpa_patching", "optimizer._target_: FusedAdam"):
        assert sum(m.startswith(key) for m in notices) == 1, (key, notices)
    assert any("accumulation" in r.getMessage() and "x 32 accumulation" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(result.export["consolidated"]))

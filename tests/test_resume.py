"""Stop and resume: a run interrupted after a checkpoint and resumed from LATEST ends with the same
weights as an uninterrupted run (CPU, fp32, same seed), and a crash mid-save never leaves a
folder that looks complete. Here the interruption is max_steps / a raised error in-process (full,
LoRA with dropout, DataLoader workers); tests/test_resume_kill.py really SIGKILLs a training
subprocess, after a checkpoint and in the middle of a save."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from train_fixture import base_config, make_model, write_dataset

from embedcore.train import checkpoint as ckpt_mod
from embedcore.train import loop as loop_mod
from embedcore.train.config import config_from_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_model(str(root / "model"))
    train = write_dataset(str(root / "train.jsonl"), 12)  # 3 steps per epoch: the resume crosses an epoch
    return root, model, train


def _config(root, model, train, name, lora=False, workers=0, **steps):
    data = base_config(model, train, None, str(root / name), num_epochs=2, ckpt_every_steps=2, **steps)
    data["dataloader"]["num_workers"] = workers  # workers prefetch: the position is the loop's own count
    if lora:  # LoRA with dropout: the RNG state must come back exactly for the masks to match
        data["peft"] = {"target_modules": ["q_proj", "v_proj", "gate_proj"], "dim": 4, "alpha": 8, "dropout": 0.2}
    # warmup + cosine over an explicit horizon, so that max_steps does not change the schedule
    data["lr_scheduler"] = {"lr_warmup_steps": 2, "lr_decay_style": "cosine", "lr_decay_steps": 4, "min_lr": 1e-4}
    data["model"]["share_encoder"] = False  # both encoders and their optimizer state go through the checkpoint
    return data


def _final_weights(folder):
    return load_file(os.path.join(folder, "model", "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("lora, workers", [(False, 0), (True, 0), (False, 2)], ids=["full", "lora_dropout", "workers"])
def test_interrupted_and_resumed_run_matches_uninterrupted(setup, lora, workers):
    root, model, train = setup
    tag = f"{'lora' if lora else 'ft'}{workers}"
    full = loop_mod.train(config_from_dict(_config(root, model, train, f"full_{tag}", lora, workers)))
    assert full.step == 6
    # "killed" after the step-4 checkpoint: a run that stops at 4, then the same command resumed from LATEST
    first = loop_mod.train(config_from_dict(_config(root, model, train, f"parts_{tag}", lora, workers, max_steps=4)))
    assert first.step == 4
    data = _config(root, model, train, f"parts_{tag}", lora, workers)
    data["checkpoint"]["restore_from"] = "LATEST"
    resumed = loop_mod.train(config_from_dict(data))
    assert resumed.step == 6
    want, got = _final_weights(full.checkpoint), _final_weights(resumed.checkpoint)
    assert want.keys() == got.keys() and any(k.startswith("passage_encoder.") for k in want)
    assert all("lora_" in k for k in want) == lora
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    # the log of the resumed run continues the interrupted one: steps 1..6 once each
    steps = [json.loads(line)["step"] for line in open(root / f"parts_{tag}" / "training.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    # and the weights really moved (the comparison is not vacuous)
    start = load_file(os.path.join(root / f"full_{tag}" / "step_2", "model", "model.safetensors"))
    assert any(not torch.equal(start[k], want[k]) for k in want)


@pytest.mark.slow
def test_crash_mid_save_keeps_the_previous_checkpoint(setup, monkeypatch):
    root, model, train = setup
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def crashing(tensors, path, *a, **kw):
        calls["n"] += 1
        if "step_4" in path and "optimizer" in path:  # the model file of step 4 is written, then the crash
            raise OSError("disk full (simulated)")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", crashing)
    with pytest.raises(OSError, match="simulated"):
        loop_mod.train(config_from_dict(_config(root, model, train, "crash")))
    folder = root / "crash"
    assert open(folder / "LATEST").read().strip() == "step_2"
    assert not (folder / "step_4").exists()
    assert (folder / ".tmp_step_4").exists() and not (folder / ".tmp_step_4" / "state.json").exists()
    assert ckpt_mod.resolve_restore("LATEST", str(folder)) == str(folder / "step_2")
    with pytest.raises(ckpt_mod.CheckpointError, match="not a complete checkpoint"):
        ckpt_mod.resolve_restore(str(folder / ".tmp_step_4"), str(folder))


def test_restore_paths(tmp_path):
    assert ckpt_mod.resolve_restore(None, str(tmp_path)) is None
    assert ckpt_mod.resolve_restore("LATEST", str(tmp_path)) is None  # nothing saved yet: a fresh start
    with pytest.raises(ckpt_mod.CheckpointError, match="does not exist"):
        ckpt_mod.resolve_restore(str(tmp_path / "step_9"), str(tmp_path))


def test_optimizer_state_round_trips_without_pickle():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3, 2)
    opt.step()
    osd = {"state": {"w": opt.state_dict()["state"][0]},
           "param_groups": [{**opt.state_dict()["param_groups"][0], "params": ["w"]}]}
    tensors, meta = ckpt_mod._flatten_optimizer(osd)
    json.dumps(meta)  # everything that is not a tensor is JSON
    back = ckpt_mod._unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"][0]["betas"] == osd["param_groups"][0]["betas"]
    for k, v in osd["state"]["w"].items():
        assert torch.equal(back["state"]["w"][k], v)

"""A run that blows up stops before the bad weights become a checkpoint: LATEST keeps naming the
last good one, the error (one line, exit 2) names it, and every saved checkpoint is finite."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from train_fixture import base_config, make_model, write_dataset

from embedcore.train.cli import main as train_main


def _train(root, data, name, capsys):
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    rc = train_main([str(path)])
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_learning_rate_1e10_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    model = make_model(str(tmp_path / "model"))
    train = write_dataset(str(tmp_path / "train.jsonl"), 16)
    ckpt = tmp_path / "ck"
    data = base_config(model, train, None, str(ckpt), max_steps=2, ckpt_every_steps=2, num_epochs=4)
    rc, err = _train(tmp_path, data, "good", capsys)
    assert rc == 0, err[-3000:]
    assert (ckpt / "LATEST").read_text().strip() == "step_2"

    # the same run resumed with a learning rate of 1e10: finite but useless weights after one step
    data = base_config(model, train, None, str(ckpt), max_steps=12, ckpt_every_steps=2, num_epochs=4)
    data["optimizer"]["lr"] = 1e10
    data["checkpoint"]["restore_from"] = "LATEST"
    rc, err = _train(tmp_path, data, "blowup", capsys)
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert "training stopped at step" in lines[0] and str(ckpt / "step_2") in lines[0], lines[0]
    assert (ckpt / "LATEST").read_text().strip() == "step_2"
    assert sorted(os.path.basename(p) for p in glob.glob(str(ckpt / "step_*"))) == ["step_2"]
    for name, value in load_file(str(ckpt / "step_2" / "model" / "model.safetensors")).items():
        assert torch.isfinite(value).all() and value.abs().max() < 1e3, name

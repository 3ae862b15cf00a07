"""A training process really killed (SIGKILL) and resumed from LATEST ends with the same
weights as an uninterrupted run (CPU, fp32, same seed).

Every run is a subprocess of the same small driver script (so the three runs share one
environment: threads, imports, nothing left over from the test process). The driver kills
itself deterministically at a chosen point, with no sleeps or timing:

- after_save k: wraps the save_checkpoint the Checkpointer calls; right after the checkpoint of step k
  is complete (renamed, LATEST updated) the process SIGKILLs itself;
- mid_cached_step k: with cached (GradCache) encoding, dies after the first of the two
  micro-batches of step k (its chunks encoded twice, gradients accumulated, no optimizer step);
- mid_save k: wraps checkpoint.save_file; when the save of step k is about to write its
  optimizer file (its RNG and model files already written under .tmp_step_k) the process
  SIGKILLs itself: the step folder must not look complete and LATEST must still point at the
  previous step.

The wrapping happens inside the child only: production code has no test hooks.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_fixture import base_config, make_model, write_dataset

from embedcore.train import checkpoint as ckpt_mod

DRIVER = r'''
import json, os, signal, sys

from embedcore.train import checkpoint, loop
from embedcore.train.config import config_from_dict

config_path, mode, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if mode == "after_save":
    real_save = checkpoint.save_checkpoint  # the name the Checkpointer calls

    def save_then_die(checkpoint_dir, step, *args, **kwargs):
        path = real_save(checkpoint_dir, step, *args, **kwargs)
        if step == kill_step:
            print("KILLING after the checkpoint of step", step, flush=True)
            die()
        return path

    checkpoint.save_checkpoint = save_then_die
elif mode == "mid_save":
    real_file = checkpoint.save_file

    def write_then_die(tensors, path, *args, **kwargs):
        if os.path.join(f".tmp_step_{kill_step}", "optim") in path:
            print("KILLING in the middle of the save of step", kill_step, flush=True)
            die()
        return real_file(tensors, path, *args, **kwargs)

    checkpoint.save_file = write_then_die
elif mode == "mid_cached_step":
    real_step, calls = loop.cached_step, []

    def cached_then_die(*args, **kwargs):  # 2 micro-batches per step: die between those of kill_step
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2 * (kill_step - 1) + 1:
            print("KILLING in the middle of cached step", kill_step, flush=True)
            die()
        return out

    loop.cached_step = cached_then_die
elif mode != "none":
    raise SystemExit(f"unknown mode {mode}")

with open(config_path) as f:
    result = loop.train(config_from_dict(json.load(f)))
print("RESULT", json.dumps({"step": result.step, "checkpoint": result.checkpoint}), flush=True)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = make_model(str(root / "model"))
    train = write_dataset(str(root / "train.jsonl"), 12)  # 3 steps per epoch, 6 in all: the resume crosses an epoch
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    full = _run(root, driver, _config(root, model, train, "full"), "none")  # the uninterrupted run
    assert full["step"] == 6
    return root, model, train, driver, full


def _config(root, model, train, name, restore=False, cached=False) -> dict:
    data = base_config(model, train, None, str(root / name), num_epochs=2, ckpt_every_steps=2)
    if cached:  # chunks of 3 of 2 queries / 6 passages; LoRA dropout: the RNG replay must survive the resume
        data["train"] = {"grad_cache": {"chunk_size": 3}}
        data["peft"] = {"target_modules": ["q_proj", "v_proj"], "dim": 4, "alpha": 8, "dropout": 0.2}
    # warmup + cosine: the learning rate differs per step, so a resume at the wrong step shows
    data["lr_scheduler"] = {"lr_warmup_steps": 2, "lr_decay_style": "cosine", "min_lr": 1e-4}
    data["model"]["share_encoder"] = False  # both encoders and their optimizer state go through the checkpoint
    if restore:
        data["checkpoint"]["restore_from"] = "LATEST"
    return data


def _run(root, driver, data: dict, mode: str, kill_step: int = 0, killed: bool = False):
    """Run the driver on `data`; returns its RESULT record, or None when it was (expected to be) killed."""
    path = root / f"config_{os.path.basename(data['checkpoint']['checkpoint_dir'])}_{mode}.json"
    path.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(driver), str(path), mode, str(kill_step)], cwd=str(root),
                          capture_output=True, text=True, timeout=600)
    if killed:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
        assert "KILLING" in proc.stdout
        return None
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _weights(folder):
    return load_file(os.path.join(folder, "model", "model.safetensors"))


def _assert_same_weights(got_folder, want_folder):
    want, got = _weights(want_folder), _weights(got_folder)
    assert want.keys() == got.keys() and any(k.startswith("passage_encoder.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def _logged_steps(folder):
    with open(os.path.join(folder, "training.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(setup):
    root, model, train, driver, full = setup
    folder = root / "after"
    _run(root, driver, _config(root, model, train, "after"), "after_save", kill_step=4, killed=True)
    assert open(folder / "LATEST").read().strip() == "step_4"
    assert not (folder / "step_6").exists()  # it really died: steps 5 and 6 never ran
    assert _logged_steps(folder) == [1, 2, 3, 4]
    resumed = _run(root, driver, _config(root, model, train, "after", restore=True), "none")
    assert resumed["step"] == 6
    _assert_same_weights(resumed["checkpoint"], full["checkpoint"])
    assert _logged_steps(folder) == [1, 2, 3, 4, 5, 6]
    # the comparison is not vacuous: the weights moved between the kill point and the end
    killed_at, final = _weights(folder / "step_4"), _weights(full["checkpoint"])
    assert any(not torch.equal(killed_at[k], final[k]) for k in final)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(setup):
    root, model, train, driver, full = setup
    folder = root / "mid"
    _run(root, driver, _config(root, model, train, "mid"), "mid_save", kill_step=4, killed=True)
    # what the killed save left behind does not look like a checkpoint
    tmp = folder / ".tmp_step_4"
    assert (tmp / "model" / "model.safetensors").is_file()  # it died after writing some files of step 4
    assert not (tmp / "optim" / "optimizer.safetensors").exists() and not (tmp / "state.json").exists()
    assert not (folder / "step_4").exists()
    assert open(folder / "LATEST").read().strip() == "step_2"
    assert ckpt_mod.resolve_restore("LATEST", str(folder)) == str(folder / "step_2")
    with pytest.raises(ckpt_mod.CheckpointError, match="not a complete checkpoint"):
        ckpt_mod.resolve_restore(str(tmp), str(folder))
    # resumed from step 2 (the remains of the killed save are replaced), it ends where the uninterrupted run ends
    resumed = _run(root, driver, _config(root, model, train, "mid", restore=True), "none")
    assert resumed["step"] == 6
    _assert_same_weights(resumed["checkpoint"], full["checkpoint"])
    assert _logged_steps(folder) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the killed run logged once
    assert not tmp.exists() and sorted(p.name for p in folder.iterdir() if p.name.startswith("step_")) == \
        ["step_2", "step_4", "step_6"]


# ------------------------------------------------------------------------------ two datasets
@pytest.fixture(scope="module")
def setup_two(tmp_path_factory, setup):
    """Two data files mixed by weights, homogeneous batches, no duplicates: 6 + 10 examples,
    8 sampler batches of 2 per epoch (4 steps of 2 micro-batches), 2 epochs."""
    root = tmp_path_factory.mktemp("kill_two")
    _, model, _, driver, _ = setup
    small = write_dataset(str(root / "small.jsonl"), 6, seed=3)
    large = write_dataset(str(root / "large.jsonl"), 10, seed=4)
    full = _run(root, driver, _config_two(root, model, [small, large], "full"), "none")
    assert full["step"] == 8
    return root, model, [small, large], driver, full


def _config_two(root, model, files, name, restore=False) -> dict:
    data = _config(root, model, files[0], name, restore)
    data["step_scheduler"]["ckpt_every_steps"] = 3  # step 6 is in the middle of epoch 1
    data["dataloader"]["dataset"].update(data_dir_list=list(files), sampling="weights", data_weights=[2.0, 1.0],
                                         homogeneous_batches=True, no_duplicates=True)
    return data


@pytest.mark.slow
def test_two_datasets_sigkill_mid_epoch_then_resume_matches_uninterrupted(setup_two):
    root, model, files, driver, full = setup_two
    folder = root / "after"
    _run(root, driver, _config_two(root, model, files, "after"), "after_save", kill_step=6, killed=True)
    assert open(folder / "LATEST").read().strip() == "step_6"
    state = json.load(open(folder / "step_6" / "state.json"))
    sampler = state["sampler"]
    assert sampler["epoch"] == 1 and sampler["position"] == 8  # 2 of 4 steps of epoch 1 x 2 micro-batches x 2
    assert sampler["mixing"] == {"sampling": "weights", "weights": [2.0, 1.0], "homogeneous": True,
                                 "no_duplicates": True, "dataset_sizes": [6, 10]}
    resumed = _run(root, driver, _config_two(root, model, files, "after", restore=True), "none")
    assert resumed["step"] == 8
    _assert_same_weights(resumed["checkpoint"], full["checkpoint"])
    assert _logged_steps(folder) == [1, 2, 3, 4, 5, 6, 7, 8]
    killed_at, final = _weights(folder / "step_6"), _weights(full["checkpoint"])
    assert any(not torch.equal(killed_at[k], final[k]) for k in final)
    # resuming under other mixing settings is refused rather than continuing another order
    other = _config_two(root, model, files, "after", restore=True)
    other["dataloader"]["dataset"]["data_weights"] = [1.0, 1.0]
    other["step_scheduler"]["num_epochs"] = 3
    path = root / "config_other.json"
    path.write_text(json.dumps(other))
    proc = subprocess.run([sys.executable, str(driver), str(path), "none", "0"], cwd=str(root),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "weights=[2.0, 1.0]" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_cached_step_then_resume_matches_uninterrupted(setup):
    root, model, train, driver, _ = setup
    full = _run(root, driver, _config(root, model, train, "cached_full", cached=True), "none")
    folder = root / "cached"
    _run(root, driver, _config(root, model, train, "cached", cached=True), "mid_cached_step", kill_step=5,
         killed=True)
    assert open(folder / "LATEST").read().strip() == "step_4" and _logged_steps(folder) == [1, 2, 3, 4]
    resumed = _run(root, driver, _config(root, model, train, "cached", restore=True, cached=True), "none")
    assert resumed["step"] == 6
    want, got = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert want.keys() == got.keys() and all("lora_" in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    killed_at = _weights(folder / "step_4")
    assert any(not torch.equal(killed_at[k], want[k]) for k in want)

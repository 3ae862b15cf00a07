"""Dispatch: explicit names win, unknown names and impossible requests are errors, never a silent switch.
The seam: each op's table names its launch modules, which share one protocol."""
import inspect
import subprocess
import sys

import pytest
import torch
from tolerance import backends_to_test

import embedcore
from embedcore import backends
from embedcore.ops import contrastive, lora_linear, maxsim, pool_l2, prefix_contrastive

TABLES = [t.IMPLEMENTATIONS for t in (pool_l2, contrastive, maxsim, lora_linear, prefix_contrastive)]


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


def _own_functions(module) -> list[str]:
    """The public functions a launch module defines itself (not the helpers it imports)."""
    return sorted(n for n, f in vars(module).items()
                  if inspect.isfunction(f) and f.__module__ == module.__name__ and not n.startswith("_"))


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.op)
def test_launch_modules_share_the_protocol_of_their_op(table):
    """cpp and triton expose exactly the op's protocol, function by function with one signature, so
    the op's autograd.Function runs either unchanged."""
    fast = [b for b in ("cpp", "triton") if b in backends_to_test()]
    modules = {b: table.launch(b) for b in fast}
    for b, module in modules.items():
        assert _own_functions(module) == sorted(table.protocol), f"{table.op} {b}: {module.__name__}"
    for name in table.protocol:
        signatures = {b: inspect.signature(getattr(m, name)) for b, m in modules.items()}
        assert len(set(signatures.values())) == 1, f"{table.op}.{name}: {signatures}"


def test_torch_has_no_launch_module():
    with pytest.raises(ValueError, match="torch runs the reference"):
        contrastive.IMPLEMENTATIONS.launch("torch")
    assert contrastive.IMPLEMENTATIONS.fast_backends()[:1] == ["cpp"]  # make builds the extension


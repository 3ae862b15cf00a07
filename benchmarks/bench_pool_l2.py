"""pool_l2: ours (cpp on CPU, triton on CUDA) against the torch reference, in one run.

Cases: B=32, S=512, D=1024, fp32 and bf16, forward and forward+backward, avg pooling with
right padding (lengths spread over 1..S so padding is realistic).
"""
import pytest
import torch

from memory import cpu_peak_growth_mib, cuda_peak_growth_mib

B, S, D = 32, 512, 1024
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CUDA = torch.cuda.is_available()

SETUP = """
import torch, embedcore
torch.manual_seed(0)
B, S, D = {B}, {S}, {D}
hidden = torch.randn(B, S, D, dtype=torch.{dtype}, device="{device}", requires_grad=True)
lengths = torch.linspace(1, S, B).long()
mask = (torch.arange(S)[None, :] < lengths[:, None]).long().to("{device}")
grad = torch.randn(B, D, dtype=torch.{dtype}, device="{device}")
"""
RUN_FWD = "with torch.no_grad():\n    out = embedcore.pool_l2(hidden, mask, 'avg', backend='{backend}')"
RUN_FWD_BWD = "out = embedcore.pool_l2(hidden, mask, 'avg', backend='{backend}'); out.backward(grad); hidden.grad = None"


def _case(dtype, device):
    scope = {}
    exec(SETUP.format(B=B, S=S, D=D, dtype=dtype, device=device), scope)
    return scope


def _params():
    for dtype in DTYPES:
        for backend, device in (("torch", "cpu"), ("cpp", "cpu"), ("torch", "cuda"), ("triton", "cuda")):
            marks = [pytest.mark.skipif(not CUDA, reason="needs CUDA")] if device == "cuda" else []
            yield pytest.param(dtype, backend, device, id=f"{dtype}-{device}-{backend}", marks=marks)


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype, backend, device", list(_params()))
def test_pool_l2(benchmark, pass_, dtype, backend, device):
    scope = _case(DTYPES[dtype], device)
    run = (RUN_FWD if pass_ == "fwd" else RUN_FWD_BWD).format(backend=backend)
    code = compile(run, "bench", "exec")

    def step():
        scope["hidden"].grad = None
        exec(code, scope)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (Triton compiles on first call)
    benchmark.group = f"pool_l2 {pass_} {dtype} {device}"
    benchmark.extra_info["backend"] = backend
    if device == "cuda":
        benchmark.extra_info["peak_mib"] = cuda_peak_growth_mib(step)
    else:
        benchmark.extra_info["peak_mib"] = cpu_peak_growth_mib(
            SETUP.format(B=B, S=S, D=D, dtype=DTYPES[dtype], device=device), run.format(backend=backend))
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)

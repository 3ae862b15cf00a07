"""LoRA linear: our LoRALinear, PEFT's LoRA Linear and the frozen base nn.Linear alone, in one run.

Case (the issue's): tokens=4096, in=out=2048, r=16, alpha=32, no dropout, forward+backward
(x requires grad, the base weight is frozen). CPU: fp32, ours = the cpp backend. CUDA (only when
present): fp32 and bf16, ours = the triton backend. The number to read is each LoRA layer's
overhead over `base` in the same group (goal: ours at most half of PEFT's on CPU; on CUDA ours
at least 1.25x faster than PEFT's layer).
"""
import pytest
import torch

from memory import cpu_peak_growth_mib, cuda_peak_growth_mib

TOKENS, IN, OUT, R, ALPHA = 4096, 2048, 2048, 16, 32
CUDA = torch.cuda.is_available()

SETUP = """
import torch
from torch import nn
torch.manual_seed(0)
dtype, device = torch.{dtype}, "{device}"
x = torch.randn({tokens}, {in_f}, dtype=dtype, device=device, requires_grad=True)
grad = torch.randn({tokens}, {out_f}, dtype=dtype, device=device)
base = nn.Linear({in_f}, {out_f}, device=device, dtype=dtype)
if "{impl}" == "base":
    layer = base.requires_grad_(False)
elif "{impl}" == "embedcore":
    from embedcore.nn.lora import LoRALinear
    layer = LoRALinear(base, {r}, {alpha}, backend="{backend}")
    lora_b = layer.lora_B.weight
else:
    from peft import LoraConfig, get_peft_model
    holder = nn.Module()
    holder.lin = base
    layer = get_peft_model(holder, LoraConfig(target_modules=["lin"], r={r}, lora_alpha={alpha})).base_model.model.lin
    lora_b = layer.lora_B["default"].weight
if "{impl}" != "base":  # a trained-looking B, so nothing can shortcut on zeros
    with torch.no_grad():
        lora_b.normal_(0, 0.02)
"""
RUN = "layer(x).backward(grad)\nx.grad = None"

IMPLS = {"cpu": (("base", "-"), ("embedcore", "cpp"), ("peft", "-")),
         "cuda": (("base", "-"), ("embedcore", "triton"), ("peft", "-"))}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}


def _setup(impl, backend, dtype, device):
    return SETUP.format(dtype=dtype, device=device, tokens=TOKENS, in_f=IN, out_f=OUT, impl=impl, backend=backend,
                        r=R, alpha=ALPHA)


def _params():
    for device, impls in IMPLS.items():
        marks = [pytest.mark.skipif(not CUDA, reason="needs CUDA")] if device == "cuda" else []
        for dtype in DTYPES[device]:
            for impl, backend in impls:
                yield pytest.param(impl, backend, dtype, device, id=f"{device}-{dtype}-{impl}", marks=marks)


@pytest.mark.parametrize("impl, backend, dtype, device", list(_params()))
def test_lora_linear_fwd_bwd(benchmark, impl, backend, dtype, device):
    scope = {}
    exec(_setup(impl, backend, dtype, device), scope)
    code = compile(RUN, "bench", "exec")

    def step():
        exec(code, scope)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (Triton compiles on first call)
    benchmark.group = f"lora_linear fwd+bwd {dtype} {device} tokens={TOKENS} in=out={IN} r={R}"
    benchmark.extra_info.update(impl=impl, backend=backend)
    if device == "cuda":
        benchmark.extra_info["peak_mib"] = cuda_peak_growth_mib(step)
    else:
        benchmark.extra_info["peak_mib"] = cpu_peak_growth_mib(_setup(impl, backend, dtype, device), RUN)
    rounds = 20 if device == "cuda" else 6
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)

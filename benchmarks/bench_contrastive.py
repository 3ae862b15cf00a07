"""contrastive_loss: ours (cpp on CPU, triton on CUDA) against the torch reference, in one run.

Forward + backward (gradients for q and p), normalised embeddings, temperature 0.02, default
layout. Cases (B, P, D): (1024, 16384, 256), and (4096, 65536, 128) where the reference's
[B, P] fp32 scores alone take 1 GiB (its peak is a few times that; it fits in 24 GiB).
extra_info: peak_mib (CPU: peak-RSS growth of a fresh subprocess over fwd+bwd, after imports,
inputs and a tiny warm-up call, the high-water mark reset first; CUDA: max_memory_allocated
growth), gradients_mib (the part of that which is dq and dp, returned by every implementation)
and gflops (8 B P D / time, the FLOP/s convention of the issue: the forward GEMM plus the
backward's three, the recompute counted as useful work).
Few rounds: the big CPU case takes seconds per call on 2 cores.
"""
import pytest
import torch

from memory import backend_params, run_case

SHAPES = {"B1024-P16384-D256": (1024, 16384, 256), "B4096-P65536-D128": (4096, 65536, 128)}
CUDA = torch.cuda.is_available()

SETUP = """
import torch
from embedcore.ops.contrastive import contrastive_loss
g = torch.Generator(device="{device}").manual_seed(0)
def unit_rows(n, d):  # normalised in place: no freed temporary may raise the RSS baseline
    x = torch.randn(n, d, generator=g, device="{device}")
    x /= x.norm(dim=-1, keepdim=True)
    return x.to(torch.{dtype}).requires_grad_()  # fp32: no copy (CPU cases are fp32 only)
def inputs(b, p, d):
    return unit_rows(b, d), unit_rows(p, d)
wq, wp = inputs(8, 32, {D})
contrastive_loss(wq, wp, 0.02, backend="{backend}").backward()  # warm-up: one-time buffers, JIT
q, p = inputs({B}, {P}, {D})
"""
RUN = """
q.grad = p.grad = None
loss = contrastive_loss(q, p, 0.02, backend="{backend}")
loss.backward()
"""


@pytest.mark.parametrize("shape, dtype, backend, device", list(backend_params(SHAPES, CUDA)))
def test_contrastive_fwd_bwd(benchmark, shape, dtype, backend, device):
    B, P, D = SHAPES[shape]
    fmt = dict(B=B, P=P, D=D, dtype=dtype, device=device, backend=backend)
    setup, run = SETUP.format(**fmt), RUN.format(**fmt)
    benchmark.group = f"contrastive fwd+bwd {shape} {dtype} {device}"
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["gradients_mib"] = (B + P) * D * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**20
    run_case(benchmark, setup, run, device)
    benchmark.extra_info["gflops"] = 8 * B * P * D / benchmark.stats.stats.median / 1e9

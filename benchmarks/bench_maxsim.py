"""maxsim_contrastive_loss: ours (cpp on CPU, triton on CUDA) against the torch reference (the
plain einsum path, which materialises the [B, P, Lq, Lp] token similarities), in one run.

Forward + backward (gradients for q_tok and p_tok), tokens L2-normalised per token, temperature
0.02, default layout (P = 8 B: 1 positive + 7 hard negatives per query). One shape: B=64 queries of
Lq=32 tokens, P=512 passages of Lp=256 tokens, D=128. Masks are int64 attention masks (as a
tokenizer gives) with right padding and seeded lengths, uniform in [8, 32] per query and in
[64, 256] per passage; padded positions hold ordinary token vectors (the op must ignore them).
B*P*Lq*Lp = 268M: the reference's fp32 similarities take 1 GiB per copy (its peak is a few of
them; it fits in 24 GiB). CPU: fp32, torch vs cpp; CUDA: fp32 and bf16, torch vs triton.
extra_info: peak_mib (CPU: peak-RSS growth of a fresh subprocess over fwd+bwd, after imports,
inputs and a tiny warm-up call, the high-water mark reset first; CUDA: max_memory_allocated
growth) and gradients_mib (the part of that which is dq and dp, returned by every implementation),
so that the issue's memory goal reads off as (peak_mib - gradients_mib) of ours against the
reference's peak_mib (goal: < 2%), and its time goal as the ratio of the medians (goal: <= 1).
Few rounds: the reference takes seconds per call on 2 cores.
"""
import pytest
import torch

from memory import backend_params, run_case

SHAPES = {"B64-Lq32-P512-Lp256-D128": (64, 32, 512, 256, 128)}
CUDA = torch.cuda.is_available()

SETUP = """
import torch
from embedcore.ops.maxsim import maxsim_contrastive_loss
g = torch.Generator(device="{device}").manual_seed(0)
def unit_tokens(n, length, d):  # normalised in place: no freed temporary may raise the RSS baseline
    x = torch.randn(n, length, d, generator=g, device="{device}")
    x /= x.norm(dim=-1, keepdim=True)
    return x.to(torch.{dtype}).requires_grad_()  # fp32: no copy (CPU cases are fp32 only)
def right_padded_mask(n, length, lo, hi):  # lengths uniform in [lo, hi]
    lengths = torch.randint(lo, hi + 1, (n,), generator=g, device="{device}")
    return (torch.arange(length, device="{device}")[None, :] < lengths[:, None]).long()
def inputs(b, lq, p, lp, d):
    return (unit_tokens(b, lq, d), right_padded_mask(b, lq, max(1, lq // 4), lq),
            unit_tokens(p, lp, d), right_padded_mask(p, lp, max(1, lp // 4), lp))
wq, wqm, wp, wpm = inputs(2, 4, 16, 8, {D})
maxsim_contrastive_loss(wq, wqm, wp, wpm, 0.02, backend="{backend}").backward()  # warm-up: one-time buffers, JIT
q, qm, p, pm = inputs({B}, {Lq}, {P}, {Lp}, {D})
"""
RUN = """
q.grad = p.grad = None
loss = maxsim_contrastive_loss(q, qm, p, pm, 0.02, backend="{backend}")
loss.backward()
"""


@pytest.mark.parametrize("shape, dtype, backend, device", list(backend_params(SHAPES, CUDA)))
def test_maxsim_fwd_bwd(benchmark, shape, dtype, backend, device):
    B, Lq, P, Lp, D = SHAPES[shape]
    fmt = dict(B=B, Lq=Lq, P=P, Lp=Lp, D=D, dtype=dtype, device=device, backend=backend)
    setup, run = SETUP.format(**fmt), RUN.format(**fmt)
    benchmark.group = f"maxsim fwd+bwd {shape} {dtype} {device}"
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["gradients_mib"] = (B * Lq + P * Lp) * D * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**20
    run_case(benchmark, setup, run, device)

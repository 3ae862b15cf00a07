"""matryoshka_contrastive_loss: ours (one pass over the score tiles for all K prefixes; cpp on CPU,
triton on CUDA) against K separate calls of our fused contrastive_loss and against the torch
reference, in one run (issue 17, item 2: "time and memory against k separate calls").

The loss: sum_k w_k InfoNCE(F.normalize(q[:, :d_k]), F.normalize(p[:, :d_k])) / temperature, with
dims [768, 512, 256, 128, 64] (K = 5, sentence-transformers' usual matryoshka_dims), weights all 1,
temperature 0.02, default layout (P = 8 B: query i's positive is passage 8 i). Inputs are raw
(not normalised) embeddings, D = 768. Forward + backward, gradients for q and p. Three cases per
shape and dtype:
  - <backend>            ours: one matryoshka_contrastive_loss(..., backend=<backend>) call;
  - <backend>-k-calls    the best a user can do with our plain op: sum over k of w_k *
                         contrastive_loss(F.normalize(q[:, :d_k]), F.normalize(p[:, :d_k]), ...,
                         backend=<backend>), K fused calls (each holds its normalised prefix copies);
  - torch                the reference (matryoshka_contrastive_loss(..., backend="torch")), what
                         sentence-transformers' MatryoshkaLoss does: K separate full [B, P] matrices.
Shapes (B, P, D): (1024, 8192, 768) and (2048, 16384, 768), where the reference's [B, P] fp32
scores take 128 MiB per prefix (640 MiB for the K prefixes, its peak a few times that).
CPU: fp32, cpp vs cpp-k-calls vs torch; CUDA: fp32 and bf16, triton vs triton-k-calls vs torch.
extra_info: backend, calls ("one pass" or "K separate"), peak_mib (CPU: peak-RSS growth of a fresh
subprocess over fwd+bwd, after imports, inputs and a tiny warm-up call, the high-water mark reset
first; CUDA: max_memory_allocated growth), gradients_mib (the part of that which is dq and dp,
returned by every implementation) and gflops (8 B P sum_k d_k / time: the work of the K separate
losses, the same numerator for every case, so it reads as a speed ratio).
Few rounds: the reference takes seconds per call on 2 cores.
"""
import pytest
import torch

from memory import run_case

SHAPES = {"B1024-P8192-D768": (1024, 8192, 768), "B2048-P16384-D768": (2048, 16384, 768)}
DIMS = (768, 512, 256, 128, 64)
WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)
CUDA = torch.cuda.is_available()

SETUP = """
import torch
import torch.nn.functional as F
from embedcore.ops.contrastive import contrastive_loss
from embedcore.ops.matryoshka import matryoshka_contrastive_loss
DIMS, WEIGHTS = {DIMS!r}, {WEIGHTS!r}
g = torch.Generator(device="{device}").manual_seed(0)
def raw_rows(n, d):  # raw embeddings: the op normalises each prefix itself
    return torch.randn(n, d, generator=g, device="{device}").to(torch.{dtype}).requires_grad_()  # fp32: no copy
def inputs(b, p, d):
    return raw_rows(b, d), raw_rows(p, d)
def matryoshka(q, p):
    return matryoshka_contrastive_loss(q, p, 0.02, dims=DIMS, weights=WEIGHTS, backend="{backend}")
def k_calls(q, p):
    return sum(w * contrastive_loss(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), 0.02,
                                    backend="{backend}") for w, d in zip(WEIGHTS, DIMS))
loss_fn = {loss_fn}
wq, wp = inputs(8, 64, {D})
loss_fn(wq, wp).backward()  # warm-up: one-time buffers, JIT
q, p = inputs({B}, {P}, {D})
"""
RUN = """
q.grad = p.grad = None
loss = loss_fn(q, p)
loss.backward()
"""


def _params():
    for shape in SHAPES:
        for case in ("torch", "cpp-k-calls", "cpp"):
            yield pytest.param(shape, "float32", case, "cpu", id=f"{shape}-K5-fp32-cpu-{case}")
        for dtype in ("float32", "bfloat16"):
            for case in ("torch", "triton-k-calls", "triton"):
                yield pytest.param(shape, dtype, case, "cuda", id=f"{shape}-K5-{dtype}-cuda-{case}",
                                   marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))


@pytest.mark.parametrize("shape, dtype, case, device", list(_params()))
def test_matryoshka_fwd_bwd(benchmark, shape, dtype, case, device):
    B, P, D = SHAPES[shape]
    backend = case.removesuffix("-k-calls")
    k_calls = case.endswith("-k-calls")
    fmt = dict(B=B, P=P, D=D, DIMS=DIMS, WEIGHTS=WEIGHTS, dtype=dtype, device=device, backend=backend,
               loss_fn="k_calls" if k_calls else "matryoshka")
    setup, run = SETUP.format(**fmt), RUN.format(**fmt)
    benchmark.group = f"matryoshka K={len(DIMS)} fwd+bwd {shape} {dtype} {device}"
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["calls"] = "K separate" if k_calls else "one pass"
    benchmark.extra_info["dims"] = list(DIMS)
    benchmark.extra_info["gradients_mib"] = (B + P) * D * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**20
    run_case(benchmark, setup, run, device)
    benchmark.extra_info["gflops"] = 8 * B * P * sum(DIMS) / benchmark.stats.stats.median / 1e9

"""Peak-memory measurement for the benchmarks.

CPU: the case runs in a fresh subprocess: set-up, one warm-up step (imports, inputs and
one-time buffers then do not count), malloc_trim so that memory the warm-up freed is
returned to the OS rather than silently reused, a reset of the process's high-water RSS through
/proc/self/clear_refs, one measured step. The growth of VmHWM over the RSS just before the step
is what the step needed; allocator caches of earlier cases cannot hide or inflate anything.
CUDA: torch.cuda.max_memory_allocated above the memory held before the step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

_RUNNER = """
import sys
sys.path.insert(0, {bench_dir!r})
{setup}
def _kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
{warmup}
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back, so the step cannot reuse it unseen
open("/proc/self/clear_refs", "w").write("5")
_before = _kib("VmRSS:")
{run}
print("PEAK_MIB", (_kib("VmHWM:") - _before) / 1024)
"""


def cpu_peak_growth_mib(setup: str, run: str, warmup: bool = True) -> float:
    """Peak RSS growth (MiB) of one `run` after `setup` (both Python source), in a fresh process."""
    setup, run = textwrap.dedent(setup), textwrap.dedent(run)
    code = _RUNNER.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), setup=setup,
                          warmup=run if warmup else "", run=run)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_MIB")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed:\n{out.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def cuda_peak_growth_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(benchmark, setup: str, run: str, device: str, rounds: int = 3) -> None:
    """One suite case: `setup` (source, which also warms the op up on tiny inputs) then `run`
    timed by pytest-benchmark; extra_info["peak_mib"] is the run's peak memory growth (CPU: in a
    fresh subprocess, see cpu_peak_growth_mib; CUDA: max_memory_allocated)."""
    scope = {}
    exec(setup, scope)
    code = compile(run, "bench", "exec")

    def step():
        exec(code, scope)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    if device == "cuda":
        benchmark.extra_info["peak_mib"] = cuda_peak_growth_mib(step)
    else:
        benchmark.extra_info["peak_mib"] = cpu_peak_growth_mib(setup, run, warmup=False)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0)


def backend_params(shapes, cuda: bool):
    """pytest params (shape, dtype, backend, device) of an op suite: fp32 torch vs cpp on the CPU;
    fp32 and bf16 torch vs triton on CUDA (skipped without it; ids hold "cuda" for gpu.sh)."""
    import pytest

    for shape in shapes:
        for backend in ("torch", "cpp"):
            yield pytest.param(shape, "float32", backend, "cpu", id=f"{shape}-fp32-cpu-{backend}")
        for dtype in ("float32", "bfloat16"):
            for backend in ("torch", "triton"):
                yield pytest.param(shape, dtype, backend, "cuda", id=f"{shape}-{dtype}-cuda-{backend}",
                                   marks=pytest.mark.skipif(not cuda, reason="needs CUDA"))

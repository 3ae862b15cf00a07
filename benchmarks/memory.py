"""Peak-memory measurement for the benchmarks.

CPU: run the case in a fresh subprocess and report how much its peak RSS grew while the op ran
(ru_maxrss after the op minus ru_maxrss after the inputs were built and the imports done), so
allocator caches of earlier cases cannot hide or inflate anything.
CUDA: torch.cuda.max_memory_allocated above the memory held before the op.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

_RUNNER = """
import gc, json, resource, sys
sys.path.insert(0, {bench_dir!r})
{setup}
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{run}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_growth_mib": (after - before) / 1024}}))
"""


def cpu_peak_growth_mib(setup: str, run: str, threads: int | None = None) -> float:
    """Peak RSS growth (MiB) of `run` after `setup`, both Python source, in a fresh process."""
    code = _RUNNER.format(bench_dir=os.path.dirname(__file__), setup=textwrap.dedent(setup), run=textwrap.dedent(run))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def cuda_peak_growth_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

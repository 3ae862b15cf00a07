"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so that the
Triton kernels run on CPU tensors here; on a CUDA machine (benchmarks/gpu.sh) it stays unset."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("EMBEDCORE_BACKEND", None)  # tests choose backends explicitly
sys.path.insert(0, os.path.dirname(__file__))

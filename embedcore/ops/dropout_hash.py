"""The counter-based dropout mask of lora_linear, shared by every backend.

A leaf module (it imports torch only): the op (embedcore/ops/lora_linear.py), the C++ launch
module and the Triton kernels all import it, so none of them imports another to reach it.

For x flattened to [M, K] the element (m, k) has index i = m * K + k (must be < 2^32) and is kept
when

    (hash32(seed, i) >> 8) >= round(p * 2^24)           (a 24-bit uniform draw vs the threshold)

hash32 = two rounds of a 32-bit integer mixer (`mix32`, constants from the hash prospector, both
below 2^31 so the torch version stays exact in int64) keyed by two keys derived from the seed.
csrc/lora_linear.cpp repeats `mix32` in C++ (it cannot import these); tests/test_lora_linear.py
reads every backend's mask back and compares it with `keep_mask`.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_C1 = 0x21F0AAAD
MIX_C2 = 0x735A2D97
KEY_SALT = 0x5BD1E995
MAX_DROPOUT_ELEMENTS = 2**32


def mix32(h):
    """32-bit integer mixer on ints or int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * MIX_C1) & MASK32
    h = h ^ (h >> 15)
    h = (h * MIX_C2) & MASK32
    return h ^ (h >> 15)


def dropout_keys(seed: int) -> tuple[int, int]:
    """The two per-call keys of the mask hash, derived from the seed (plain Python ints)."""
    s = int(seed) & MASK32
    return mix32(s), mix32(s ^ KEY_SALT)


def dropout_threshold(p: float) -> int:
    """An element is kept when its 24-bit draw is >= this threshold."""
    return int(round(p * (1 << 24)))


def kernel_mask_args(dropout_p: float, seed: int) -> tuple[bool, int, int, int]:
    """(dropout on, key 1, key 2, threshold): the mask as the fast backends' kernels take it, so
    that they regenerate it instead of storing it."""
    if dropout_p <= 0:
        return False, 0, 0, 0
    k1, k2 = dropout_keys(seed)
    return True, k1, k2, dropout_threshold(dropout_p)


def keep_mask(seed: int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """The dropout keep-mask (bool [rows, cols]) every backend uses for x flattened to [rows, cols]."""
    if rows * cols > MAX_DROPOUT_ELEMENTS:
        raise ValueError(f"lora_linear: dropout supports at most 2^32 input elements per call, got {rows * cols}")
    k1, k2 = dropout_keys(seed)
    idx = torch.arange(rows * cols, device=device, dtype=torch.int64).view(rows, cols)
    h = mix32(mix32(idx ^ k1) ^ k2)
    return (h >> 8) >= dropout_threshold(p)

"""Pooler: nn.Module face of pool_l2."""
from torch import nn

from embedcore.ops.pool_l2 import MODES, pool_l2


class Pooler(nn.Module):
    def __init__(self, mode: str = "avg", normalize: bool = True, eps: float = 1e-12, backend: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Pooler: unknown mode {mode!r}; expected one of {MODES}")
        self.mode, self.normalize, self.eps, self.backend = mode, normalize, eps, backend

    def forward(self, hidden, attention_mask):
        return pool_l2(hidden, attention_mask, self.mode, self.normalize, self.eps, self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}, backend={self.backend}"

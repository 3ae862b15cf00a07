"""LoRALinear: an existing nn.Linear plus a trainable low-rank update, on the fused op.

Parameter names are chosen so that state dicts stay familiar:
  weight, bias          the base layer's own Parameters (same objects, frozen), so a model's
                        base keys are unchanged by LoRA (`<path>.weight`)
  lora_A.weight [r, in], lora_B.weight [out, r]
                        PEFT's names and shapes: the PEFT adapter key of a module at <path> is
                        `base_model.model.<path>.lora_A.weight` (see embedcore.lora.peft_format)
The LoRA factors live in small holder modules rather than nn.Linear, so that nothing which
looks for nn.Linear layers (LoRA "all linear" matching, quantisers, HF weight init) picks them up.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embedcore.backends import accumulation_dtype
from embedcore.ops.lora_linear import lora_linear


def check_lora_hparams(r, alpha, dropout) -> None:
    """Raise ValueError naming the expected range for a bad LoRA rank, alpha or dropout."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRAFactor(nn.Module):
    """Holds one LoRA factor as `.weight` (so its state-dict key ends in `lora_A.weight`)."""

    def __init__(self, rows: int, cols: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) A^T B^T, with the base layer frozen.

    base: the nn.Linear to wrap (its weight/bias Parameters are reused, not copied, and frozen).
    r, alpha: rank and LoRA alpha (scaling = alpha / r, PEFT's default, non-rslora).
    dropout: LoRA-input dropout probability, active in training mode only.
    backend: None (dispatch by device), "torch", "cpp" or "triton".
    Init follows PEFT: A kaiming-uniform (a = sqrt(5)), B zeros, so a fresh layer equals the base.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_lora_hparams(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.lora_dropout = r, alpha, float(dropout)
        self.scaling = alpha / r
        self.backend = backend
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = LoRAFactor(r, self.in_features, **factory)
        self.lora_B = LoRAFactor(self.out_features, r, **factory)
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's rule), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in the weight's dtype (computed in fp32, fp64 for fp64)."""
        acc = accumulation_dtype(self.weight.dtype)
        delta = self.lora_B.weight.detach().to(acc) @ self.lora_A.weight.detach().to(acc)
        return (delta * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into the base weight; forward then is the plain linear layer."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged; call unmerge() first")
        acc = accumulation_dtype(self.weight.dtype)
        self.weight.copy_((self.weight.to(acc) + self.delta_weight().to(acc)).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (exact up to one rounding of the weight dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        acc = accumulation_dtype(self.weight.dtype)
        self.weight.copy_((self.weight.to(acc) - self.delta_weight().to(acc)).to(self.weight.dtype))
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling B A (merges this layer in place; no weight copy)."""
        if not self.merged:
            self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           dropout_p=p, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, merged={self.merged}")

"""ContrastiveLoss: nn.Module face of contrastive_loss (blockwise InfoNCE)."""
import math

from torch import nn

from embedcore.ops.contrastive import contrastive_loss


class ContrastiveLoss(nn.Module):
    """InfoNCE over in-batch and hard negatives, tile by tile (see embedcore.ops.contrastive).

    forward(q [B, D], p [P, D], positive_index=None, passage_ids=None, return_ranks=False)
    returns the mean loss (fp32; fp64 for fp64 inputs), or (loss, ranks [B] int64).
    """

    def __init__(self, temperature: float = 0.02, backend: str | None = None):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"ContrastiveLoss: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature, self.backend = float(temperature), backend

    def forward(self, q, p, positive_index=None, passage_ids=None, return_ranks=False):
        return contrastive_loss(q, p, self.temperature, positive_index, passage_ids, return_ranks, self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend}"

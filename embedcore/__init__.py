"""embedcore: fused kernels for fine-tuning embedding models, plus a thin trainer.

Ops (each takes backend=None|"torch"|"triton"|"cpp"; see embedcore.backends):
    pool_l2, contrastive_loss, maxsim_contrastive_loss (ColBERT late interaction), lora_linear;
    matryoshka_contrastive_loss and filtered_contrastive_loss (one pass over the score tiles for
    several prefixes; in-batch false-negative filtering); maxsim_scores (blockwise MaxSim, forward only)
Modules:
    Pooler, ContrastiveLoss, LoRALinear
LoRA on any transformers model:
    apply_lora
Everything but pool_l2 is imported lazily, so `import embedcore` stays cheap for other trainers.
"""
import importlib as _importlib

from embedcore import backends as _backends
from embedcore.backends import available_backends, backend_status
from embedcore.nn.pooler import Pooler
from embedcore.ops.pool_l2 import pool_l2

__version__ = "0.1.0"

_LAZY = {
    "contrastive_loss": "embedcore.ops.contrastive",
    "ContrastiveLoss": "embedcore.nn.contrastive",
    "maxsim_contrastive_loss": "embedcore.ops.maxsim",
    "maxsim_scores": "embedcore.ops.maxsim",
    "matryoshka_contrastive_loss": "embedcore.ops.matryoshka",
    "filtered_contrastive_loss": "embedcore.ops.matryoshka",
    "lora_linear": "embedcore.ops.lora_linear",
    "LoRALinear": "embedcore.nn.lora",
    "apply_lora": "embedcore.lora.apply",
}

__all__ = ["pool_l2", "Pooler", "available_backends", "backend_status", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embedcore' has no attribute {name!r}")


_cpp_ok, _cpp_why = backend_status("cpp")["cpp"]  # cpp only: probing triton would import it
if not _cpp_ok:  # said once, at import: CPU tensors then run the torch reference
    _backends.notice_fallback("cpp", _cpp_why)

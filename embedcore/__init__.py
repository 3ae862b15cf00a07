"""embedcore: fused kernels for fine-tuning embedding models, plus a thin trainer.

Ops (each takes backend=None|"torch"|"triton"|"cpp"; see embedcore.backends):
    pool_l2, contrastive_loss, lora_linear
Modules:
    Pooler, ContrastiveLoss, LoRALinear
"""
import logging as _logging

from embedcore.backends import available_backends, backend_status
from embedcore.ops.pool_l2 import pool_l2
from embedcore.nn.pooler import Pooler

__version__ = "0.1.0"

_cpp_ok, _cpp_why = backend_status()["cpp"]
if not _cpp_ok:  # said once, at import: CPU tensors then run the torch reference
    _logging.getLogger("embedcore").warning("embedcore: %s; CPU ops use the torch reference backend", _cpp_why)

__all__ = ["pool_l2", "Pooler", "available_backends"]

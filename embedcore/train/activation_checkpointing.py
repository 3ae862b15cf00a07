"""Activation checkpointing per transformer block: keep only each block's inputs in the forward
and recompute the block in the backward (about one extra forward of the encoder per step, for
activation memory ~ one block instead of all of them: the option for long sequences).

`apply_activation_checkpointing(model)` applies torch's composable, non-reentrant checkpoint
(`torch.distributed._composable.checkpoint`) to every `model.transformer_blocks()` entry. It works
through forward hooks, so:
  - the module tree and every parameter / state_dict name stay as they were (no
    `_checkpoint_wrapped_module.` prefix): checkpoints, LoRA target matching, exports and
    `transformer_blocks()` see the same model;
  - keyword arguments reach the block unchanged (Hugging Face decoder layers take attention_mask,
    position_embeddings, ... as kwargs; BERT layers take positional ones);
  - the RNG state is saved before each block and restored for its recompute, so dropout masks
    in the recompute are those of the forward;
  - it composes with FSDP2: apply it BEFORE `fully_shard` (as torchtitan does); FSDP2 skips its
    pre-forward unshard during the recompute (its pre-backward hook has unsharded the block).
"""
from __future__ import annotations

from torch import nn


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `apply_activation_checkpointing` (torch's composable checkpoint) is on `module`."""
    from torch.distributed._composable.contract import _get_registry

    return "checkpoint" in (_get_registry(module) or {})


def apply_activation_checkpointing(model: nn.Module, blocks: list[nn.Module] | None = None) -> int:
    """Checkpoint every transformer block of `model` (`model.transformer_blocks()` unless `blocks`
    is given), in place. Must run before sharding (fully_shard). Returns the number of blocks.
    Raises ValueError when the model is already sharded or already checkpointed, or when the
    parameter names would change (they never should)."""
    from torch.distributed._composable import checkpoint

    blocks = list(model.transformer_blocks() if blocks is None else blocks)
    if not blocks:
        raise ValueError(f"activation checkpointing: {type(model).__name__} has no transformer blocks")
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("activation checkpointing must be applied before the model is sharded (fully_shard)")
    done = [i for i, b in enumerate(blocks) if is_checkpointed(b)]
    if done:
        raise ValueError(f"activation checkpointing is already applied (block {done[0]})")
    names = list(model.state_dict().keys())
    for block in blocks:
        checkpoint(block, use_reentrant=False, preserve_rng_state=True)
    if list(model.state_dict().keys()) != names:  # pragma: no cover - a torch that wraps modules
        raise ValueError("activation checkpointing changed the state_dict names")
    return len(blocks)

"""Make a decoder-only backbone (Llama, Qwen2, Qwen3, Mistral) attend bidirectionally.

Two things make a transformers 5.x decoder causal, and both must go:

1. the mask: `LlamaModel.forward` calls `masking_utils.create_causal_mask`, which returns
   `create_bidirectional_mask(...)` instead when `config.is_causal` is False (transformers >= 5.2);
2. the attention call: when there is no padding the bidirectional mask is skipped (`None`), and SDPA
   then falls back to `is_causal=module.is_causal`, which `LlamaAttention.__init__` hard-codes to True.
   The model's forward is wrapped by `merge_with_config_defaults`, which passes
   `is_causal=config.is_causal` down through every layer to the attention function, so a False config
   value reaches SDPA / flash-attention too.

So the whole switch is per instance: `config.is_causal = False` (saved in config.json, which is also
how sentence-transformers >= 5.x / transformers >= 5.2 runs the exported folder bidirectionally with
no remote code) plus `is_causal = False` on every attention module (belt and braces for attention
functions that read the module attribute). No class or global function is patched, so other models in
the process are unaffected. `check_bidirectional` proves it on the live model, because a transformers
version that ignored the flag would otherwise train a causal model silently.

Mistral / Qwen sliding-window layers become *bidirectional sliding-window* layers (transformers'
`create_bidirectional_sliding_window_mask`); for sequences shorter than the window (the usual embedding
case) that is full bidirectional attention.
"""
from __future__ import annotations

import torch

# model_type values made bidirectional; any other decoder-only model_type is refused (see backbone.py).
BIDIRECTIONAL_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every self-attention module of a decoder (modules that carry an `is_causal` attribute)."""
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "q_proj")]


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded decoder to bidirectional attention in place (see module docstring); returns it."""
    mods = attention_modules(model)
    if not mods:
        raise ValueError(
            f"make_bidirectional: found no attention module with an `is_causal` attribute in "
            f"{type(model).__name__}; this transformers version lays the model out differently"
        )
    model.config.is_causal = False
    for m in mods:
        m.is_causal = False
    return model


@torch.no_grad()
def check_bidirectional(model: torch.nn.Module, seq_len: int = 6) -> None:
    """Raise if changing the LAST token does not change the FIRST token's hidden state.

    Run on the model as configured (its attention implementation), once without padding (where SDPA
    gets no mask and must be told is_causal=False) and once with left padding (where the mask must be
    the bidirectional one). Cost: two forwards of 2 x `seq_len` tokens.
    """
    vocab = model.config.vocab_size
    param = next(model.parameters())
    ids = torch.arange(1, seq_len + 1, device=param.device).remainder(vocab).unsqueeze(0).repeat(2, 1)
    ids[1, -1] = (ids[1, -1] + 7) % vocab
    for pad in (0, 2):
        mask = torch.ones_like(ids)
        mask[:, :pad] = 0
        was_training = model.training
        model.eval()
        try:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        finally:
            model.train(was_training)
        first = pad  # first real token
        if torch.allclose(h[0, first], h[1, first], rtol=0, atol=1e-6):
            raise RuntimeError(
                f"check_bidirectional: {type(model).__name__} ({model.config._attn_implementation} attention, "
                f"{'left padding' if pad else 'no padding'}) still attends causally after make_bidirectional: "
                f"the first token ignores the last one. The installed transformers probably does not honour "
                f"config.is_causal=False (needs transformers >= 5.2)."
            )

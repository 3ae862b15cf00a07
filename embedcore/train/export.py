"""The end-of-run export into the last checkpoint folder:

    step_N/model/consolidated/  Hugging Face + sentence-transformers folder (Biencoder.save_pretrained);
                                full fine-tuning runs, and LoRA runs with export_merged_lora (merged)
    step_N/model/adapter/       LoRA runs: the adapter in PEFT format (adapter_config.json,
                                adapter_model.safetensors) for the query encoder's HF model;
                                adapter/passage_encoder/ when the encoders are separate

Each folder is written under a temporary name and renamed when complete. With FSDP the full
state is gathered to rank 0, which loads it into an unsharded copy of the model and exports it.
"""
from __future__ import annotations

import logging
import os
import shutil

from embedcore.train import build
from embedcore.train.checkpoint import full_model_state
from embedcore.train.distributed import barrier

log = logging.getLogger(__name__)


def _atomic_folder(final: str, write) -> str:
    tmp = os.path.join(os.path.dirname(final), f".tmp_{os.path.basename(final)}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    write(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def _unsharded_copy(trainer, full_state: dict):
    """A plain (CPU) Biencoder, LoRA applied as in training, holding `full_state`."""
    model = build.build_model(trainer.cfg)
    if trainer.cfg.peft is not None:
        build.apply_peft(trainer.cfg, model)
    model.load_state_dict(full_state, strict=True)
    return model


def export_final(trainer, checkpoint_folder: str) -> dict:
    """Write the consolidated export (and the LoRA adapter) into checkpoint_folder/model.
    Collective; returns {"consolidated": path, "adapter": path} (what was written) on every rank."""
    cfg, info = trainer.cfg, trainer.info
    ck = cfg.checkpoint
    lora = cfg.peft is not None
    want_consolidated = ck.save_consolidated and (not lora or ck.export_merged_lora)
    if not (want_consolidated or lora):
        return {}
    full_state = full_model_state(trainer.model, trainable_only=False) if trainer.sharded else None
    out = {}
    if info.is_main:
        model = _unsharded_copy(trainer, full_state) if trainer.sharded else trainer.model
        coll = cfg.dataloader.collate_fn
        target = os.path.join(checkpoint_folder, "model")
        os.makedirs(target, exist_ok=True)
        if lora:
            from embedcore.lora.peft_format import save_adapter

            base = cfg.model.pretrained_model_name_or_path

            def write_adapters(d):  # one PEFT adapter per encoder, keyed like the plain HF model
                save_adapter(model.query_encoder, d, base_model_name_or_path=base)
                if not model.share_encoder:
                    save_adapter(model.passage_encoder, os.path.join(d, "passage_encoder"), base_model_name_or_path=base)

            out["adapter"] = _atomic_folder(os.path.join(target, "adapter"), write_adapters)
        if want_consolidated:
            if lora:
                from embedcore.lora.peft_format import merge_lora

                merge_lora(model)  # in place: LoRALinear -> nn.Linear with the merged weight
            from embedcore.models.st_export import add_prompts

            # The prefixes training fed (per-dataset instructions resolved; the configured ones
            # when instructions are off), and one named prompt pair per instructed corpus.
            query_prefix, passage_prefix, prompts = build.export_prompts(cfg, trainer.train_set)

            def write_consolidated(d):
                model.save_pretrained(d, trainer.tokenizer, query_prefix=query_prefix, passage_prefix=passage_prefix,
                                      max_seq_length=max(coll.q_max_len, coll.p_max_len))
                add_prompts(d, prompts)

            out["consolidated"] = _atomic_folder(os.path.join(target, "consolidated"), write_consolidated)
        for kind, path in out.items():
            log.info("exported %s: %s", kind, path)
    barrier(info)
    from embedcore.train.distributed import broadcast_object

    return broadcast_object(out, info)

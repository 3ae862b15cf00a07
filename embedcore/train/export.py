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

from embedcore.files import atomic_folder
from embedcore.train import build
from embedcore.train.checkpoint import full_model_state
from embedcore.distributed import barrier, broadcast_object

log = logging.getLogger(__name__)


class Exporter:
    """The end-of-run export of a model into a checkpoint folder (see the module docstring).
    prompts: (query prefix, passage prefix, {prompt name: prefix}), what training fed
    (embedcore.train.build.export_prompts). Collective under FSDP (`sharded`)."""

    def __init__(self, cfg, tokenizer, prompts: tuple, info, sharded: bool):
        self.cfg, self.tokenizer, self.prompts, self.info, self.sharded = cfg, tokenizer, prompts, info, sharded
        ck, self.lora = cfg.checkpoint, cfg.peft is not None
        self.want_consolidated = ck.save_consolidated and (not self.lora or ck.export_merged_lora)

    def _unsharded_copy(self, full_state: dict):
        """A plain (CPU) Biencoder, LoRA applied as in training, holding `full_state`."""
        model = build.build_model(self.cfg)
        if self.lora:
            build.apply_peft(self.cfg, model)
        model.load_state_dict(full_state, strict=True)
        return model

    def export(self, model, checkpoint_folder: str) -> dict:
        """Write the consolidated export (and the LoRA adapter) into checkpoint_folder/model. Returns
        {"consolidated": path, "adapter": path} (what was written) on every rank."""
        if not (self.want_consolidated or self.lora):
            return {}
        full_state = full_model_state(model, trainable_only=False) if self.sharded else None
        out = {}
        if self.info.is_main:
            if self.sharded:
                model = self._unsharded_copy(full_state)
            target = os.path.join(checkpoint_folder, "model")
            os.makedirs(target, exist_ok=True)
            if self.lora:
                out["adapter"] = atomic_folder(os.path.join(target, "adapter"), lambda d: self._write_adapters(model, d))
            if self.want_consolidated:
                out["consolidated"] = atomic_folder(os.path.join(target, "consolidated"),
                                                     lambda d: self._write_consolidated(model, d))
            for kind, path in out.items():
                log.info("exported %s: %s", kind, path)
        barrier(self.info)
        return broadcast_object(out, self.info)

    def _write_adapters(self, model, folder: str) -> None:
        """One PEFT adapter per encoder, keyed like the plain HF model."""
        from embedcore.lora.peft_format import save_adapter

        base = self.cfg.model.pretrained_model_name_or_path
        save_adapter(model.query_encoder, folder, base_model_name_or_path=base)
        if not model.share_encoder:
            save_adapter(model.passage_encoder, os.path.join(folder, "passage_encoder"), base_model_name_or_path=base)

    def _write_consolidated(self, model, folder: str) -> None:
        from embedcore.models.st_export import add_matryoshka_dims, add_prompts

        if self.lora:
            from embedcore.lora.peft_format import merge_lora

            merge_lora(model)  # in place: LoRALinear -> nn.Linear with the merged weight (the run is over)
        # The prefixes training fed (per-dataset instructions resolved; the configured ones when
        # instructions are off), and one named prompt pair per instructed corpus.
        query_prefix, passage_prefix, prompts = self.prompts
        coll = self.cfg.dataloader.collate_fn
        model.save_pretrained(folder, self.tokenizer, query_prefix=query_prefix, passage_prefix=passage_prefix,
                              max_seq_length=max(coll.q_max_len, coll.p_max_len))
        add_prompts(folder, prompts)
        if self.cfg.loss.matryoshka_dims:
            add_matryoshka_dims(folder, self.cfg.loss.matryoshka_dims)

"""Backbones and the biencoder (imported lazily: this package pulls in transformers).

    backbone.py       load_backbone(path) -> (model, backbone_info); load_tokenizer; prepare_tokenizer
    bidirectional.py  make_bidirectional / check_bidirectional for Llama, Qwen2, Qwen3, Mistral
    biencoder.py      Biencoder (shared or separate encoders, pool_l2, FSDP units, consolidated export)
    st_export.py      sentence-transformers folders: read settings, write the export's ST files
    tiny.py           make_tiny_llama: a local tiny Llama + BPE tokenizer for tests and the quickstart
"""

"""PEFT-format adapters, checked against the real peft library on a tiny Llama built locally:
ours -> peft.PeftModel.from_pretrained, peft -> our load_adapter, and the merged export."""
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel

from embedcore.lora.apply import apply_lora, lora_layers
from embedcore.lora.peft_format import load_adapter, merge_lora, save_adapter
from embedcore.nn.lora import LoRALinear

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    """(config, base state dict, input ids): every model here starts from the same weights."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    state = LlamaModel(config).state_dict()
    ids = torch.randint(0, 128, (3, 11))
    return config, state, ids


def fresh(llama):
    config, state, _ = llama
    model = LlamaModel(config).eval()
    model.load_state_dict(state)
    return model


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def test_ours_loads_in_peft_with_same_outputs(llama, tmp_path):
    ids = llama[2]
    ours = fresh(llama)
    apply_lora(ours, target_modules=TARGETS, r=8, alpha=16, dropout=0.1)
    randomise_lora(ours)
    ours.eval()
    expected = out(ours, ids)
    assert (expected - out(fresh(llama), ids)).abs().max() > 1e-2, "the adapter must change the outputs"
    save_adapter(ours, str(tmp_path), base_model_name_or_path="tiny-llama")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * len(TARGETS)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == "tiny-llama"

    peft_model = PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval()
    torch.testing.assert_close(out(peft_model, ids), expected, rtol=1e-5, atol=1e-5)
    # PEFT put adapters on exactly our layers and no others
    peft_targets = {n.removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert peft_targets == {"base_model.model." + n for n in lora_layers(ours)}


def test_peft_adapter_loads_in_ours_with_same_outputs(llama, tmp_path):
    ids = llama[2]
    torch.manual_seed(3)
    peft_model = get_peft_model(fresh(llama), LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "up_proj"],
                                                         init_lora_weights=False)).eval()
    expected = out(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))

    ours = fresh(llama)
    summary = load_adapter(ours, str(tmp_path))
    assert summary.replaced == [f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.k_proj", "mlp.up_proj")]
    assert summary.r == 4 and summary.alpha == 12
    assert all(isinstance(m, LoRALinear) and m.scaling == 3.0 for m in lora_layers(ours).values())
    torch.testing.assert_close(out(ours.eval(), ids), expected, rtol=1e-5, atol=1e-5)

    # loading into a model that already has the same LoRA layers only replaces the weights
    again = fresh(llama)
    apply_lora(again, target_modules=["k_proj", "up_proj"], r=4, alpha=12)
    load_adapter(again, str(tmp_path))
    torch.testing.assert_close(out(again, ids), expected, rtol=1e-5, atol=1e-5)


def test_merged_export_is_a_plain_model_without_adapter_files(llama, tmp_path):
    ids = llama[2]
    model = fresh(llama)
    apply_lora(model, match_all_linear=True, r=4, alpha=8)
    randomise_lora(model)
    expected = out(model, ids)
    merged = merge_lora(model)
    assert len(merged) == 14 and not lora_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in merged)
    assert set(model.state_dict()) == set(llama[1]), "merged model keeps the base model's keys"
    torch.testing.assert_close(out(model, ids), expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(str(tmp_path))
    files = os.listdir(tmp_path)
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    reloaded = LlamaModel.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(out(reloaded, ids), expected, rtol=1e-4, atol=1e-4)


def test_suffix_collision_is_saved_as_exact_regex(tmp_path):
    """Replacing 'out' but not 'block.out': a list ['out'] would also match 'block.out' in PEFT."""
    model = nn.Module()
    model.out = nn.Linear(6, 5)
    model.block = nn.Module()
    model.block.out = nn.Linear(6, 6)
    apply_lora(model, target_modules=r"out", r=2, alpha=2)
    save_adapter(model, str(tmp_path))
    target = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str)
    fresh_model = nn.Module()
    fresh_model.out = nn.Linear(6, 5)
    fresh_model.block = nn.Module()
    fresh_model.block.out = nn.Linear(6, 6)
    assert list(lora_layers(fresh_model)) == []
    load_adapter(fresh_model, str(tmp_path))
    assert list(lora_layers(fresh_model)) == ["out"]


def _saved(llama, tmp_path):
    model = fresh(llama)
    apply_lora(model, target_modules=["q_proj"], r=2, alpha=4)
    save_adapter(model, str(tmp_path))
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_load_errors_name_the_problem(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(fresh(llama), str(tmp_path))
    d = _saved(llama, tmp_path)
    _edit_config(d, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(fresh(llama), str(d))
    _edit_config(d, use_dora=False, target_modules=["q_proj"])
    state = load_file(d / "adapter_model.safetensors")
    state["base_model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 64)
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.k_proj', which is not a LoRA layer"):
        load_adapter(fresh(llama), str(d))
    wrong_rank = fresh(llama)
    apply_lora(wrong_rank, target_modules=["q_proj"], r=3, alpha=4)
    del state["base_model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter has r=2, lora_alpha=4 but the model's LoRA layer .* has r=3"):
        load_adapter(wrong_rank, str(d))
    _edit_config(d, r=3)
    with pytest.raises(ValueError, match=r"has shape \(2, 64\), the model expects \(3, 64\)"):
        load_adapter(wrong_rank, str(d))
    _edit_config(d, r=2)
    del state["base_model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no weights for LoRA layer\(s\) \['layers\.1\.self_attn\.q_proj\.lora_B'\]"):
        load_adapter(fresh(llama), str(d))


def test_all_linear_config_and_save_errors(llama, tmp_path):
    d = _saved(llama, tmp_path)
    _edit_config(d, target_modules="all-linear")
    model = fresh(llama)
    with pytest.raises(ValueError, match="no weights for LoRA layer"):  # all-linear applied, weights only for q_proj
        load_adapter(model, str(d))
    assert len(lora_layers(model)) == 14
    with pytest.raises(ValueError, match="has no LoRA layers"):
        save_adapter(fresh(llama), str(tmp_path / "x"))
    model = fresh(llama)
    apply_lora(model, target_modules=["q_proj"], r=2, alpha=4)
    next(iter(lora_layers(model).values())).merge()
    with pytest.raises(ValueError, match="merged into its base weight"):
        save_adapter(model, str(tmp_path / "y"))

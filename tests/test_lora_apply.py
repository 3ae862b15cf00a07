"""LoRALinear (init, names, merge/unmerge, dropout) and apply_lora on small transformers models."""
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from embedcore.lora.apply import apply_lora, lora_layers
from embedcore.nn.lora import LoRALinear
from tolerance import backends_to_test, device_for, resolve_ok


def tiny_llama_config():
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                vocab_size=64, max_position_embeddings=32)).eval()


def test_fresh_layer_equals_base_and_has_peft_init_and_names():
    torch.manual_seed(0)
    base = nn.Linear(33, 21)
    x = torch.randn(4, 5, 33)
    expected = base(x).detach()
    layer = LoRALinear(base, r=7, alpha=14)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.weight is base.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.shape == (7, 33) and layer.lora_B.weight.shape == (21, 7)
    assert torch.count_nonzero(layer.lora_B.weight) == 0, "PEFT init: B = 0"
    bound = 1 / math.sqrt(33)  # kaiming_uniform(a=sqrt(5)) on fan_in=33
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound and a.std() > 0.4 * bound
    assert layer.scaling == 2.0
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge_round_trip(dtype):
    torch.manual_seed(1)
    base = nn.Linear(40, 24, dtype=dtype)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8, backend="torch")
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 40, dtype=dtype)
    y = layer(x)
    assert not torch.allclose(y, base(x)), "non-zero B must change the output"
    layer.merge()
    assert layer.merged
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(layer(x), y, **tol)
    layer.unmerge()
    eps = torch.finfo(dtype).eps
    # one rounding on the way in, one on the way out: within 2 ulp of |W + delta|
    bound = 2 * eps * (original.float().abs() + layer.delta_weight().float().abs()) + 1e-12
    assert ((layer.weight.float() - original.float()).abs() <= bound).all()
    torch.testing.assert_close(layer(x), y, **tol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training():
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=4, dropout=0.5, backend="torch")
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(10, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(a, layer(x)), "dropout must be reproducible under torch.manual_seed"
    assert not torch.equal(a, layer(x))


def test_apply_lora_llama_targets_freeze_and_summary():
    torch.manual_seed(0)
    model = LlamaModel(tiny_llama_config())
    summary = apply_lora(model, target_modules=["q_proj", "v_proj"], r=8, alpha=16)
    assert summary.replaced == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    lora_params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora_params == {f"{n}.{f}.weight" for n in summary.replaced for f in ("lora_A", "lora_B")}
    expected_trainable = sum(8 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert summary.trainable_params == expected_trainable
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert "trainable" in str(summary)
    # gradients reach the LoRA factors only
    ids = torch.randint(0, 128, (2, 7))
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == lora_params


def test_apply_lora_regex_exclude_and_all_linear():
    model = LlamaModel(tiny_llama_config())
    s = apply_lora(model, target_modules=r"layers\.1\.mlp\.(up|down)_proj", r=2, alpha=2)
    assert s.replaced == ["layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    model = LlamaModel(tiny_llama_config())
    s = apply_lora(model, match_all_linear=True, exclude_modules=["o_proj"], r=2, alpha=2)
    assert len(s.replaced) == 2 * 6 and not any(n.endswith("o_proj") for n in s.replaced)
    lm = LlamaForCausalLM(tiny_llama_config())
    s = apply_lora(lm, match_all_linear=True, r=2, alpha=2)
    assert "lm_head" not in s.replaced and len(s.replaced) == 2 * 7, "all-linear skips the output head"


def test_apply_lora_bert_and_backends_agree():
    bert = tiny_bert()
    ids = torch.randint(0, 64, (2, 9))
    base_out = bert(input_ids=ids).last_hidden_state.detach()
    s = apply_lora(bert, target_modules=["query", "value", "dense"], r=4, alpha=8)
    assert "pooler.dense" in s.replaced and "encoder.layer.0.attention.output.dense" in s.replaced
    torch.testing.assert_close(bert(input_ids=ids).last_hidden_state, base_out, rtol=1e-5, atol=1e-5)
    for m in lora_layers(bert).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    outs = []
    for backend in [b for b in backends_to_test() if device_for(b) == "cpu"]:
        resolve_ok(backend)
        for m in lora_layers(bert).values():
            m.backend = backend
        outs.append(bert(input_ids=ids).last_hidden_state.detach())
    assert not torch.allclose(outs[0], base_out, atol=1e-3)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["q_proj", "nonexistent_proj"]), r"'nonexistent_proj' matches no module.*q_proj"),
        (dict(target_modules=r"layers\.9\..*"), "matches no module"),
        (dict(target_modules=["self_attn"]), "must be nn.Linear"),
        (dict(target_modules=["q_proj"], exclude_modules=["nope"]), "exclude_modules entry 'nope'"),
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "no linear layer left"),
        (dict(), "needs target_modules"),
        (dict(target_modules=["q_proj"], match_all_linear=True), "either"),
        (dict(target_modules=["q_proj"], r=0), "positive integer"),
        (dict(target_modules=["q_proj"], r=2.5), "positive integer"),
        (dict(target_modules=["q_proj"], alpha=0), r"alpha must be a number > 0"),
        (dict(target_modules=["q_proj"], alpha=-1.0), r"alpha must be a number > 0"),
        (dict(target_modules=["q_proj"], dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=["q_proj"], dropout=-0.1), r"dropout must be in \[0, 1\)"),
    ],
)
def test_apply_lora_bad_input(kwargs, message):
    model = LlamaModel(tiny_llama_config())
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **kwargs)
    assert not lora_layers(model), "a failed apply_lora must leave the model untouched"
    assert all(p.requires_grad for p in model.parameters())


def test_apply_lora_twice_is_an_error():
    model = LlamaModel(tiny_llama_config())
    apply_lora(model, target_modules=["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, target_modules=["k_proj"], r=2, alpha=2)

"""Merging adapters into the base weights, unmerging, and unloading."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoraConfig,
    LoraLayer,
    apply_lora,
    disable_adapters,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from models import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from numerics import RELATIVE_TOLERANCE, assert_parity

CONFIGS = {
    "lora": LoraConfig(r=4, target_modules="all-linear"),
    "dora": LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "gpt2-embedding": LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"], use_dora=True),
}


def _model(name: str) -> nn.Module:
    model = tiny_gpt2(tied=False) if name.startswith("gpt2") else tiny_llama()
    apply_lora(model, CONFIGS[name])
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_forward_equals_unmerged_forward(name: str) -> None:
    model = _model(name)
    tokens = token_batch()
    expected = model(tokens).logits
    merge_lora(model)
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(model))
    assert_parity(model(tokens).logits, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_then_unmerge_restores_the_weights(name: str) -> None:
    model = _model(name)
    before = copy.deepcopy(model.state_dict())
    merge_lora(model)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        assert_parity(value, before[key], msg=key)


def test_merge_and_unload_returns_plain_modules_with_the_same_outputs() -> None:
    model = _model("gpt2-embedding")
    tokens = token_batch()
    expected = model(tokens).logits
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert type(plain.transformer.wte) is nn.Embedding
    assert not any(".lora_" in k for k in plain.state_dict())
    reference = tiny_gpt2(tied=False)
    assert plain.state_dict().keys() == reference.state_dict().keys()
    assert_parity(plain(tokens).logits, expected)


def test_merge_refuses_a_weight_tied_to_another_module() -> None:
    model = apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "wte"]))
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="lm_head"):
        merge_lora(model)
    assert not any(layer.merged_adapters for _, layer in lora_layers(model))


def test_merge_refuses_nan_and_leaves_every_weight_unchanged() -> None:
    model = _model("lora")
    before = copy.deepcopy(model.state_dict())
    last = lora_layers(model)[-1][1]
    with torch.no_grad():
        last.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge_lora(model)
    after = model.state_dict()
    for key, value in before.items():
        if ".lora_" not in key:
            assert torch.equal(after[key], value), key
    assert not any(layer.merged_adapters for _, layer in lora_layers(model))


def test_disable_adapters_gives_base_outputs_and_restores_merged_state() -> None:
    base = tiny_llama()
    tokens = token_batch()
    expected = base(tokens).logits
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, use_dora=True))
    randomize_adapters(model)
    adapted = model(tokens).logits
    merge_lora(model)
    with disable_adapters(model):
        assert_parity(model(tokens).logits, expected)
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(model))
    assert_parity(model(tokens).logits, adapted)


def test_unload_without_merge_restores_the_base_model() -> None:
    base = tiny_bert()
    tokens = token_batch()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "word_embeddings"]))
    randomize_adapters(model)
    merge_lora(model)
    unload_lora(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert_parity(model(tokens).logits, base(tokens).logits)


def test_merge_needs_adapters() -> None:
    with pytest.raises(ValueError, match="apply_lora"):
        merge_lora(tiny_llama())


def test_loading_new_values_into_a_merged_adapter_is_refused() -> None:
    from lightning_lora import adapter_state_dict, load_adapter_state_dict

    model = _model("lora")
    fresh = {k: torch.zeros_like(v) for k, v in adapter_state_dict(model).items()}
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter_state_dict(model, fresh)
    unmerge_lora(model)
    load_adapter_state_dict(model, fresh)


def test_dora_unmerge_works_after_the_model_changes_dtype() -> None:
    model = _model("dora")
    before = {k: v.double() for k, v in model.state_dict().items()}
    merge_lora(model)
    model.double()
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        assert_parity(value, before[key], rel=RELATIVE_TOLERANCE[torch.float32], msg=key)  # merged in float32

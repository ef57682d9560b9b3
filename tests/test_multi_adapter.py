"""Several named adapters on one model: active set, deletion, independence."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_lora import (
    LoraConfig,
    LoraLayer,
    adapter_names,
    adapter_state_dict,
    apply_lora,
    delete_adapter,
    lora_layers,
    mark_only_adapters_trainable,
    merge_lora,
    set_active_adapters,
)
from models import randomize_adapters, tiny_llama, token_batch
from numerics import assert_parity


def _two_adapter_model():
    base = tiny_llama()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "first")
    apply_lora(model, LoraConfig(r=2, target_modules=["v_proj", "o_proj"], use_dora=True), "second")
    randomize_adapters(model)
    return base, model


def test_adapters_live_side_by_side_and_all_keep_training() -> None:
    _, model = _two_adapter_model()
    assert adapter_names(model) == ["first", "second"]
    v_proj = model.model.layers[0].self_attn.v_proj
    assert list(v_proj.lora_settings) == ["first", "second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model, "first")) | set(adapter_state_dict(model, "second"))


def test_mark_only_adapters_trainable_freezes_the_others() -> None:
    _, model = _two_adapter_model()
    mark_only_adapters_trainable(model, "second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model, "second"))


def test_active_adapters_choose_what_forward_uses() -> None:
    base, model = _two_adapter_model()
    tokens = token_batch()
    both = model(tokens).logits
    set_active_adapters(model, "first")
    only_first = model(tokens).logits
    set_active_adapters(model, [])
    assert_parity(model(tokens).logits, base(tokens).logits)
    assert not torch.allclose(both, only_first)
    reference = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "first")
    reference.load_state_dict(adapter_state_dict(model, "first"), strict=False)
    assert_parity(only_first, reference(tokens).logits)


def test_delete_adapter_removes_its_tensors_and_restores_plain_layers() -> None:
    base, model = _two_adapter_model()
    delete_adapter(model, "second")
    assert adapter_names(model) == ["first"]
    assert not any("second" in k for k in model.state_dict())
    assert not isinstance(model.model.layers[0].self_attn.o_proj, LoraLayer)
    delete_adapter(model, "first")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert model.state_dict().keys() == base.state_dict().keys()


def test_unknown_adapter_names_are_rejected() -> None:
    _, model = _two_adapter_model()
    with pytest.raises(ValueError, match="Unknown adapter"):
        set_active_adapters(model, ["third"])
    with pytest.raises(ValueError, match="Unknown adapter"):
        delete_adapter(model, "third")


def test_a_merge_beside_an_active_dora_adapter_is_refused() -> None:
    _, model = _two_adapter_model()
    with pytest.raises(ValueError, match="DoRA"):
        merge_lora(model)
    with pytest.raises(ValueError, match="DoRA"):
        merge_lora(model, adapter_names=["first"])  # v_proj also runs the DoRA adapter "second"
    assert not any(layer.merged_adapters for _, layer in lora_layers(model))


def test_a_dora_adapter_merges_exactly_when_it_acts_alone() -> None:
    _, model = _two_adapter_model()
    set_active_adapters(model, "second")
    tokens = token_batch()
    expected = model(tokens).logits
    merge_lora(model)
    assert_parity(model(tokens).logits, expected)


def test_merging_an_unknown_adapter_is_refused() -> None:
    _, model = _two_adapter_model()
    with pytest.raises(ValueError, match="Unknown adapter"):
        merge_lora(model, adapter_names=["frist"])

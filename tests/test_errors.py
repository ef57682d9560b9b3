"""Bad input fails early with a message that names the fix, and leaves the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_llama
from torch import nn

from lightning_lora import LoraConfig, adapter_state_dict, apply_lora, load_adapter_state_dict


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict, classes: dict) -> None:
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha": -4}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init": "pizza"}, "Unknown init 'pizza'"),
        ({"init": "orthogonal", "r": 3}, "even rank"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be an integer"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_to_transform": "1"}, "layers_to_transform must be a non-empty list of layer indices"),
        ({"target_modules": 5}, "target_modules must be a list of non-empty module names or one regex string"),
        ({"exclude_modules": 3}, "exclude_modules must be a list of non-empty module names or one regex string"),
        ({"modules_to_save": "head"}, r"modules_to_save must be a list of module names .* got 'head' \(str\)"),
    ],
)
def test_invalid_config_fields_are_refused_on_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "config, message",
    [
        (LoraConfig(target_modules=["q_prj"]), r"matches no layer.*Close names: \['q_proj'"),
        (LoraConfig(target_modules=r".*\.attn\.q"), "matches no layer"),
        (LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]), "after exclude_modules / layers_to_transform"),
        (LoraConfig(r=64, target_modules=["k_proj"], init="pissa"), r"r=64 is too large.*at most 16.*rank_pattern"),
        (LoraConfig(target_modules=["input_layernorm"]), r"cannot carry a LoRA adapter.*LlamaRMSNorm.*modules_to_save"),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["clasifier"]), "matches no module"),
    ],
)
def test_bad_targets_fail_before_the_model_changes(config: LoraConfig, message: str) -> None:
    model = tiny_llama()
    before, classes = _state(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    _assert_untouched(model, before, classes)


def test_failure_in_the_middle_of_injection_rolls_everything_back(monkeypatch) -> None:
    from lightning_lora.core.surgery import inject

    model = tiny_llama()
    before, classes = _state(model), {n: type(m) for n, m in model.named_modules()}
    calls = []

    def failing_add(layer, name, settings):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        original_add(layer, name, settings)

    original_add = inject._add_adapter
    monkeypatch.setattr(inject, "_add_adapter", failing_add)
    with pytest.raises(RuntimeError, match="simulated"):
        apply_lora(model, LoraConfig(r=2, target_modules="all-linear", bias="all"))
    _assert_untouched(model, before, classes)
    assert not any(hasattr(m, "_lora_saved_with") for m in model.modules())


def test_same_adapter_name_twice_is_refused() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'.*delete_adapter"):
        apply_lora(model, LoraConfig(target_modules=["v_proj"]))


@pytest.mark.parametrize("name", ["", "a.b", 3, "to", "keys", "two words"])
def test_invalid_adapter_names_are_refused_before_the_model_changes(name) -> None:
    model = tiny_llama()
    before, classes = _state(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="adapter_name"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"]), adapter_name=name)
    _assert_untouched(model, before, classes)


def test_an_init_that_reads_non_finite_weights_fails_before_the_model_changes() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    before, classes = _state(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(v, before[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())


def _trained_state(config: LoraConfig) -> dict:
    model = apply_lora(tiny_llama(), config)
    return {k: torch.randn_like(v) for k, v in adapter_state_dict(model).items()}


@pytest.mark.parametrize(
    "saved_config, message",
    [
        (LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "shape mismatch"),
        (LoraConfig(r=4, target_modules=["q_proj"]), "missing key"),
        (LoraConfig(r=4, target_modules=["q_proj", "v_proj", "k_proj"]), "unexpected key"),
        (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), "unexpected key"),
    ],
)
def test_loading_an_adapter_state_that_does_not_fit_changes_nothing(saved_config, message) -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = copy.deepcopy(adapter_state_dict(model))
    with pytest.raises(ValueError, match=f"{message}.*another LoraConfig"):
        load_adapter_state_dict(model, _trained_state(saved_config))
    assert all(torch.equal(adapter_state_dict(model)[k], v) for k, v in before.items())


def test_loading_a_fitting_adapter_state_copies_it_in_place() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    parameter = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    state = _trained_state(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    load_adapter_state_dict(model, state)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"] is parameter
    assert all(torch.equal(adapter_state_dict(model)[k], v) for k, v in state.items())

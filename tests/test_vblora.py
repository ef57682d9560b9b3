"""VB-LoRA beyond the kinds table (tests/kind_cases.py): its one trained vector bank shared by every adapted layer,
PEFT's ``save_only_topk_weights`` files, and its config refusals."""

from __future__ import annotations

import pytest
import torch
from kind_cases import build, deep, model_input, randomized
from numerics import assert_parity
from safetensors.torch import load_file

from lightning_lora import (
    VBLoRAConfig,
    adapter_state_dict,
    apply_lora,
    delete_adapter,
    load_adapter,
    lora_layers,
    lora_param_groups,
    merge_and_unload,
    save_adapter,
)

peft = pytest.importorskip("peft")

FIELDS = dict(r=3, num_vectors=8, vector_length=4, topk=2, init_vector_bank_bound=0.5)
TARGETS = ["lin0", "lin1"]


def vblora(**overrides) -> VBLoRAConfig:
    return VBLoRAConfig(target_modules=TARGETS, **{**FIELDS, **overrides})


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_bank_is_one_parameter_held_once_in_memory_and_once_in_files(tmp_path) -> None:
    model = apply_lora(build("mlp"), vblora())
    apply_lora(model, vblora(r=2), "second")
    bank = model.vblora_vector_bank["default"]
    assert model.lin0.vblora_vector_bank is model.lin1.vblora_vector_bank is model.vblora_vector_bank
    assert isinstance(bank, torch.nn.Parameter) and bank.requires_grad and bank.shape == (8, 4)
    assert sum(p is bank for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if "vector_bank" in k] == [
        "vblora_vector_bank.default", "vblora_vector_bank.second"
    ]
    assert "vblora_vector_bank.default" in adapter_state_dict(model)
    save_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "native", format="lightning_lora")
    peft_keys = [k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors") if "vector_bank" in k]
    native_keys = [k for k in load_file(tmp_path / "native" / "adapter_model.safetensors") if "vector_bank" in k]
    assert peft_keys == ["base_model.vblora_vector_bank"] and native_keys == ["vblora_vector_bank"]
    model.double()
    assert model.lin1.vblora_vector_bank["default"].dtype == torch.float64  # moved once, seen by every layer
    delete_adapter(model, "default")
    assert "default" not in model.vblora_vector_bank and "second" in model.lin0.vblora_vector_bank
    delete_adapter(model, "second")
    assert model.state_dict().keys() == build("mlp").state_dict().keys()
    assert not hasattr(model, "vblora_vector_bank") and not hasattr(model.lin0, "vblora_vector_bank")


def test_the_optimizer_sees_the_bank_once_in_the_adapter_group() -> None:
    model = apply_lora(build("mlp"), vblora())
    bank = model.vblora_vector_bank["default"]
    groups = lora_param_groups(model, lr=1e-3)
    assert [g["name"] for g in groups if any(p is bank for p in g["params"])] == ["adapter"]
    assert sum(p is bank for g in groups for p in g["params"]) == 1


def test_gradients_reach_the_bank_from_every_layer_and_equal_peft(tmp_path) -> None:
    base = build("mlp").double()
    ours = randomized(apply_lora(deep(base), vblora()))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(deep(base), tmp_path, is_trainable=True)
    bank = ours.vblora_vector_bank["default"]
    x = model_input("mlp").double()
    for layer, inputs in ((ours.lin0, x), (ours.lin1, torch.relu(ours.lin0(x)).detach())):
        bank.grad = None
        layer(inputs).sum().backward()
        assert bank.grad is not None and bank.grad.abs().sum() > 0  # each layer alone trains the bank
    ours.zero_grad(set_to_none=True)
    for model in (ours, theirs):
        model(x).square().sum().backward()
    assert_parity(bank.grad, theirs.base_model.vblora_vector_bank["default"].grad, msg="bank gradient")
    for name in ("lin0", "lin1"):
        theirs_layer = theirs.base_model.model.get_submodule(name)
        for container in ("vblora_logits_A", "vblora_logits_B"):
            mine = getattr(ours.get_submodule(name), container)["default"].grad
            assert_parity(mine, getattr(theirs_layer, container)["default"].grad, msg=f"{name}.{container}")


def _peft_topk_files(tmp_path, model_name: str = "mlp"):
    """A PEFT top-k file (float32: PEFT 0.21 reads no other top-k weights) and PEFT's model loaded from it; both
    models are then cast to float64 for the comparison."""
    base = build(model_name)
    torch.manual_seed(7)
    config = peft.VBLoRAConfig(target_modules=TARGETS, save_only_topk_weights=True, **FIELDS)
    peft.get_peft_model(deep(base), config).save_pretrained(tmp_path)
    return base.double(), peft.PeftModel.from_pretrained(deep(base), tmp_path).double()


@pytest.mark.parametrize("model_name", ["mlp", "hf-conv1d"])
def test_a_peft_topk_file_loads_for_inference_and_merge_with_peft_outputs(model_name: str, tmp_path) -> None:
    base, theirs = _peft_topk_files(tmp_path, model_name)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert stored["base_model.model.lin0.vblora_logits_A_topk_indices"].dtype == torch.uint8
    assert "base_model.model.lin0.vblora_logits_A" not in stored
    ours = load_adapter(deep(base), tmp_path)
    x = model_input(model_name).double()
    with torch.no_grad():
        assert_parity(ours(x), theirs(x), msg="unmerged")
        expected = theirs(x)
    assert_parity(merge_and_unload(deep(ours))(x), expected, msg="merged")


def test_training_an_adapter_from_a_peft_topk_file_is_refused_by_name(tmp_path) -> None:
    base, _ = _peft_topk_files(tmp_path)
    ours = load_adapter(deep(base), tmp_path)
    with pytest.raises(RuntimeError, match="save_only_topk_weights=True.* not training"):
        ours(model_input("mlp").double())


def test_our_topk_export_loads_in_peft_with_our_outputs(tmp_path) -> None:
    base = build("hf-conv1d")  # float32: PEFT 0.21 reads float32 top-k weights only
    ours = randomized(apply_lora(deep(base), vblora(save_only_topk_weights=True, num_vectors=300)))
    save_adapter(ours, tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert stored["base_model.model.lin1.vblora_logits_B_topk_indices"].dtype == torch.int16  # 300 vectors
    assert stored["base_model.model.lin1.vblora_logits_B_topk_weights"].shape == (2, 3, 1)  # [out / 4, r, topk - 1]
    theirs = peft.PeftModel.from_pretrained(deep(base), tmp_path)
    x = model_input("hf-conv1d")
    with torch.no_grad():
        assert_parity(theirs(x), ours(x))
    save_adapter(ours, tmp_path / "native", format="lightning_lora")  # native files keep the whole logits
    reloaded = load_adapter(deep(base), tmp_path / "native")
    for key, value in adapter_state_dict(ours).items():
        assert torch.equal(adapter_state_dict(reloaded)[key], value), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(vector_length=8), r"vector_length=8 does not divide the 12 input and 20 output .* lin0 .*\[1, 2, 4\]"),
        (dict(vector_length=5), r"vector_length=5 does not divide .* exclude_modules"),
    ],
)
def test_a_vector_length_that_does_not_fit_a_layer_is_refused_and_the_model_untouched(overrides, message) -> None:
    model = build("mlp")
    before = plain_state(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, vblora(**overrides))
    assert not lora_layers(model) and not hasattr(model, "vblora_vector_bank")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(topk=9), "topk=9 exceeds num_vectors=8"),
        (dict(init_vector_bank_bound=0.0), "init_vector_bank_bound must be a finite number > 0"),
        (dict(r=0), "r must be an integer >= 1"),
        (dict(init_logits_std=-1.0), "init_logits_std must be"),
        (dict(vblora_dropout=1.0), "vblora_dropout must be in"),
    ],
)
def test_config_values_that_cannot_work_are_refused_by_name(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        vblora(**overrides)


def test_the_meta_device_is_refused_by_name_and_the_model_untouched() -> None:
    with torch.device("meta"):
        model = build("mlp")
    with pytest.raises(ValueError, match="VB-LoRA builds its shared vector bank .* meta device"):
        apply_lora(model, vblora())
    assert not lora_layers(model) and not hasattr(model, "vblora_vector_bank")

"""PEFT interchange: our exports load in PEFT, PEFT-written adapters load here, vLLM-ready exports. Both sides run in
float64, so outputs and gradients agree to float64 rounding (``numerics.assert_parity``)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from adapter_cases import (
    CASES,
    assert_unchanged,
    case_config,
    inputs_for,
    make_svd_initialised,
    outputs,
    snapshot,
    trained_model,
)
from models import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity
from peft_oracle import peft_adapter_grads, peft_twin
from safetensors.torch import load_file
from torch import nn

from lightning_lora import (
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    peft_adapter_state,
    save_adapter,
)
from lightning_lora.core.files import peft_export
from lightning_lora.core.inits.initializers import register_initializer

peft = pytest.importorskip("peft")


def _trained64(case: str) -> tuple[nn.Module, nn.Module]:
    """``trained_model(case)`` in float64."""
    base, model = trained_model(case)
    return base.double(), model.double()


def _inputs64(base: nn.Module) -> torch.Tensor:
    inputs = inputs_for(base)
    return inputs.double() if inputs.is_floating_point() else inputs


def _outputs64(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = outputs(model, inputs)
    assert out.dtype == torch.float64
    return out


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on GPT-2 and about missing hub configs
        yield


def _peft_load(base: nn.Module, directory, **kwargs) -> nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory), **kwargs).eval()


def _peft_written_adapter(case: str, directory) -> nn.Module:
    """An adapter trained (randomised) and saved by PEFT itself, with PEFT's own config for the case."""
    base = CASES[case][0]().double()
    theirs = peft_twin(base, case_config(case))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:  # adapters, DoRA magnitudes, modules_to_save copies, trained biases
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    theirs.save_pretrained(str(directory))
    return base, theirs.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_peft_with_equal_outputs(case: str, tmp_path) -> None:
    base, ours = _trained64(case)
    inputs = _inputs64(base)
    save_adapter(ours, tmp_path, format="peft")

    theirs = _peft_load(base, tmp_path)
    assert_parity(_outputs64(theirs, inputs), _outputs64(ours, inputs))


@pytest.mark.parametrize("case", list(CASES))
def test_export_has_exactly_the_keys_and_shapes_peft_writes(case: str, tmp_path) -> None:
    base, ours = trained_model(case)
    save_adapter(ours, tmp_path / "ours", format="peft")
    peft_twin(base, case_config(case)).save_pretrained(str(tmp_path / "theirs"))

    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    their_tensors = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    # Left out, as PEFT's loader does not need them: whole embedding matrices of targeted embed_tokens layers, and
    # second copies of a modules_to_save bias that bias="all" also catches.
    their_shapes = {
        k: tuple(v.shape)
        for k, v in their_tensors.items()
        if not k.endswith("base_layer.weight") and ".modules_to_save." not in k and ".original_module." not in k
    }
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == their_shapes


@pytest.mark.parametrize("case", list(CASES))
def test_peft_written_adapter_loads_with_equal_outputs(case: str, tmp_path) -> None:
    base, theirs = _peft_written_adapter(case, tmp_path)
    inputs = _inputs64(base)

    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert_parity(_outputs64(ours, inputs), _outputs64(theirs, inputs))


def test_training_continues_from_a_peft_written_adapter(tmp_path) -> None:
    base, _ = _peft_written_adapter("llama-dora-embedding", tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    theirs = _peft_load(base, tmp_path, is_trainable=True)
    frozen_before = {k: v.clone() for k, v in ours.state_dict().items() if ".lora_" not in k}
    tokens = token_batch()

    for model in (ours, theirs):
        model(input_ids=tokens, labels=tokens).loss.backward()
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == adapter_state_dict(ours).keys()
    their_grads = peft_adapter_grads(theirs, list(our_grads))
    for key, grad in our_grads.items():
        assert grad.dtype == torch.float64
        assert_parity(grad, their_grads[key].reshape(grad.shape), msg=key)

    adapter_before = {k: v.clone() for k, v in adapter_state_dict(ours).items()}
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(v, adapter_state_dict(ours)[k]) for k, v in adapter_before.items())
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in frozen_before.items())


def test_peft_task_heads_that_the_model_lacks_are_ignored(tmp_path) -> None:
    # PEFT's SEQ_CLS task adds modules_to_save=["classifier", "score"]; BERT has no "score".
    base = tiny_bert().double()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(str(tmp_path))

    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert "classifier.weight" in adapter_state_dict(ours)
    tokens = token_batch()
    assert_parity(_outputs64(ours, tokens), _outputs64(theirs.eval(), tokens))


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("builder, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])],
                         ids=["llama", "gpt2"])
def test_svd_initialised_adapter_exports_as_delta_on_the_original_base(builder, targets, use_rslora, tmp_path):
    original = builder()
    ours = apply_lora(copy.deepcopy(original), LoraConfig(r=4, alpha=8, target_modules=targets,
                                                          use_rslora=use_rslora))
    make_svd_initialised(ours)  # in float32: the residual base holds float32 rounding that PEFT's delta does not
    save_adapter(ours, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    assert math.isclose(config["lora_alpha"], 8 * (math.sqrt(2) if use_rslora else 2))
    theirs = _peft_load(original, tmp_path)
    tokens = token_batch()
    assert_parity(outputs(theirs, tokens), outputs(ours, tokens))


def test_svd_initialised_dora_adapter_is_refused(tmp_path) -> None:
    ours = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    make_svd_initialised(ours)
    with pytest.raises(ValueError, match="DoRA.*format='lightning_lora'"):
        save_adapter(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite_base_init(layer, adapter_name) -> None:
    """A test init that changes the base weight and keeps no factors."""
    layer.weight.mul_(0.5)


register_initializer("test_rewrites_base", _rewrite_base_init)


def test_adapter_whose_init_rewrote_the_base_without_factors_is_refused(tmp_path) -> None:
    ours = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init="test_rewrites_base"))
    with pytest.raises(ValueError, match="no exact delta"):
        save_adapter(ours, tmp_path / "out")


def test_vllm_export_has_one_rank_and_scaling_and_only_lora_tensors(tmp_path) -> None:
    base = tiny_llama().double()
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True,
                                                      rank_pattern={"layers.0.*": 2}, alpha_pattern={"o_proj": 3}))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path, format="vllm")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["rank_pattern"], config["alpha_pattern"], config["use_rslora"]) == ({}, {}, False)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} == {config["r"]}
    tokens = token_batch()
    assert_parity(_outputs64(_peft_load(base, tmp_path), tokens), _outputs64(ours, tokens))


@pytest.mark.parametrize("option, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias"),
])
def test_vllm_export_refuses_what_vllm_cannot_serve(option: dict, message: str, tmp_path) -> None:
    ours = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], **option))
    with pytest.raises(ValueError, match=message):
        save_adapter(ours, tmp_path / "out", format="vllm")
    assert not (tmp_path / "out").exists()


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = nn.ModuleDict({"fc": nn.Linear(8, 8)})


def test_export_refuses_an_adapter_peft_would_put_on_more_layers(tmp_path) -> None:
    # PEFT's "fc" (or any name) would also select "block.fc": the root "fc" alone cannot be named.
    ours = apply_lora(_Nested(), LoraConfig(r=2, target_modules=r"fc"))
    with pytest.raises(ValueError, match="unambiguously"):
        save_adapter(ours, tmp_path / "out")


def test_export_checks_its_config_against_the_tensors(monkeypatch, tmp_path) -> None:
    ours = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.0.*": 2}))
    monkeypatch.setattr(peft_export, "_patterns", lambda values, default: {})  # a config that forgets the ranks
    with pytest.raises(ValueError, match="PEFT would load wrongly.*config gives r=4"):
        save_adapter(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_finite_adapter_values(tmp_path) -> None:
    ours = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        lora_layers(ours)[0][1].lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        peft_adapter_state(ours)


def _write_peft_config(tmp_path, **changes) -> None:
    base = tiny_llama()
    peft_twin(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), "peft_type='IA3'"),
    (dict(lora_bias=True, use_qalora=True), "no lightning_lora equivalent"),
    (dict(init_lora_weights="loftq"), "init_lora_weights='loftq'"),
], ids=["other-peft-type", "unsupported-options", "unsupported-init"])
def test_peft_configs_lightning_lora_cannot_honour_are_refused(changes, message, tmp_path) -> None:
    _write_peft_config(tmp_path, **changes)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


class _Wrapper(nn.Module):
    """What a LightningModule holding a Hugging Face model as ``self.model`` looks like to PEFT names."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()


def test_peft_adapter_loaded_into_a_wrapping_module_names_the_fix(tmp_path) -> None:
    _write_peft_config(tmp_path)
    model = _Wrapper()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"relative to the model PEFT wrapped.*load_adapter\(module.model"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)

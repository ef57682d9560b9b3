"""CorDA (data-driven SVD init, both modes) through calibrate_adapters: factors, residual and outputs equal PEFT's
preprocess_corda + get_peft_model on the same calibration samples, adapter files both ways, and restoring without
the data. Single process; the Lightning callback and DDP/FSDP2 runs are in test_calibration_lightning.py."""

from __future__ import annotations

import copy

import pytest
import torch
from models import fresh, tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity
from torch import nn

import lightning_lora.core.inits.corda as corda
from lightning_lora import (
    LoraConfig,
    QuantizationConfig,
    adapter_state_dict,
    apply_lora,
    calibrate_adapters,
    initialize_pending_adapters,
    load_adapter,
    load_adapter_state_dict,
    lora_layers,
    save_adapter,
)

MODES = ["ipm", "kpm"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")




def samples(count: int = 6) -> list[torch.Tensor]:
    """Calibration samples of different lengths, one per tensor (PEFT's CorDA runs one sample per forward)."""
    return [token_batch(batch=1, length=6 + i % 3, seed=10 + i) for i in range(count)]


def padded_batches(single: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The same samples two per batch, right-padded, with their attention masks."""
    batches = []
    for first, second in zip(single[0::2], single[1::2]):
        length = max(first.shape[1], second.shape[1])
        ids = torch.zeros(2, length, dtype=torch.long)
        mask = torch.zeros(2, length, dtype=torch.long)
        for row, sample in enumerate((first[0], second[0])):
            ids[row, : len(sample)], mask[row, : len(sample)] = sample, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def config(mode: str = "ipm", **overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "target_modules": LLAMA_TARGETS, "init": f"corda_{mode}", **overrides})


def peft_corda(base: nn.Module, ours: LoraConfig, mode: str, calibration: list[torch.Tensor]) -> nn.Module:
    """PEFT's CorDA on a copy of ``base``: preprocess_corda running each sample, then get_peft_model."""
    import peft
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    peft_config = peft.LoraConfig(r=ours.r, lora_alpha=ours.alpha, target_modules=ours.target_modules,
                                  init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode))
    model = copy.deepcopy(base)
    preprocess_corda(model, peft_config, run_model=lambda: [model(sample) for sample in calibration])
    return peft.get_peft_model(model, peft_config)


def calibrated(mode: str = "ipm", builder=tiny_llama, batches=None, **overrides) -> nn.Module:
    model = apply_lora(fresh(builder), config(mode, **overrides))
    calibrate_adapters(model, samples() if batches is None else batches)
    return model


def perturb(model: nn.Module, seed: int = 3) -> None:
    """"Train": move lora_A and lora_B (not the frozen initial factors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for container in (layer.lora_A, layer.lora_B):
                for value in container.values():
                    value.add_(0.05 * torch.randn(value.shape, generator=generator))


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def assert_matches_peft(ours: nn.Module, theirs: nn.Module, rtol: float) -> None:
    state = theirs.state_dict()
    assert lora_layers(ours)
    for name, layer in lora_layers(ours):
        prefix = f"base_model.model.{name}"
        expected = {
            "lora_A": state[f"{prefix}.lora_A.default.weight"],
            "lora_B": state[f"{prefix}.lora_B.default.weight"],
            "weight": state[f"{prefix}.base_layer.weight"],
        }
        found = {"lora_A": layer.lora_A["default"], "lora_B": layer.lora_B["default"], "weight": layer.weight}
        for key, value in expected.items():
            torch.testing.assert_close(found[key], value, atol=rtol * value.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("builder, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_corda_matches_peft_on_the_same_samples(mode: str, builder, targets) -> None:
    base = fresh(builder)
    ours = calibrated(mode, builder, target_modules=targets)
    theirs = peft_corda(base, config(mode, target_modules=targets), mode, samples())
    assert_matches_peft(ours, theirs, rtol=1e-6)
    tokens = token_batch(batch=2, length=8, seed=99)
    assert_parity(logits(ours, tokens), logits(theirs, tokens))  # PEFT's CorDA refuses float64: compared in float32


@pytest.mark.parametrize("mode", MODES)
def test_padded_batches_equal_peft_run_on_the_unpadded_samples_one_at_a_time(mode: str) -> None:
    ours = calibrated(mode, batches=padded_batches(samples()))
    theirs = peft_corda(fresh(), config(mode), mode, samples())
    assert_matches_peft(ours, theirs, rtol=1e-3)  # padding changes only the rounding of the batched activations


def test_ipm_takes_the_largest_and_kpm_the_smallest_components() -> None:
    ipm, kpm = calibrated("ipm"), calibrated("kpm")
    for (name, first), (_, second) in zip(lora_layers(ipm), lora_layers(kpm)):
        norms = [(layer.lora_B["default"] @ layer.lora_A["default"]).norm() for layer in (first, second)]
        assert norms[0] > norms[1], name


@pytest.mark.parametrize("mode", MODES)
def test_outputs_equal_the_base_model_and_initial_factors_are_kept(mode: str) -> None:
    model = calibrated(mode)
    tokens = token_batch()
    assert_parity(logits(model, tokens), logits(fresh(), tokens))
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_init_A["default"], layer.lora_A["default"]), name
        assert not layer.lora_init_A["default"].requires_grad and layer.lora_A["default"].requires_grad
        assert not torch.equal(layer.weight, fresh().get_submodule(name).weight)  # the residual


def test_adapter_stays_pending_until_calibrated_and_says_how() -> None:
    model = apply_lora(fresh(), config())
    assert all(not layer.lora_settings["default"].initialized for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="calibrate_adapters"):
        initialize_pending_adapters(model)
    with pytest.raises(RuntimeError, match="not initialised"):
        logits(model, token_batch())
    assert all(torch.equal(layer.weight, fresh().get_submodule(name).weight) for name, layer in lora_layers(model))
    assert calibrate_adapters(model, samples()) == {"default": {name: 4 for name, _ in lora_layers(model)}}


def test_calibration_leaves_training_mode_and_other_adapters_as_they_were() -> None:
    model = apply_lora(fresh(), LoraConfig(r=2, target_modules=["o_proj"]), adapter_name="other")
    apply_lora(model, config())
    model.train()
    calibrate_adapters(model, samples())
    assert all(module.training for module in model.modules())
    assert not any(layer.adapters_disabled for _, layer in lora_layers(model))
    assert all(layer.lora_settings["other"].initialized for name, layer in lora_layers(model) if "o_proj" in name)


def test_restoring_a_saved_state_does_not_recalibrate(monkeypatch: pytest.MonkeyPatch) -> None:
    trained = calibrated()
    perturb(trained)
    monkeypatch.setattr(corda.CovarianceCollector, "add", lambda *args: pytest.fail("calibrated again"))
    model = apply_lora(fresh(), config(), initialize=False)
    load_adapter_state_dict(model, adapter_state_dict(trained))
    assert calibrate_adapters(model, samples()) == {}  # nothing pending: restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_native_adapter_file_rebuilds_the_residual_without_the_data(tmp_path, monkeypatch) -> None:
    trained = calibrated("kpm")
    perturb(trained)
    save_adapter(trained, tmp_path, format="lightning_lora")
    monkeypatch.setattr(corda.CovarianceCollector, "add", lambda *args: pytest.fail("calibrated again"))
    model = load_adapter(fresh(), tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


@pytest.mark.parametrize("mode", MODES)
def test_exported_corda_adapter_loads_in_peft_on_the_original_base(mode: str, tmp_path) -> None:
    import peft

    trained = calibrated(mode)
    perturb(trained)
    save_adapter(trained, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    assert theirs.peft_config["default"].r == 8  # [A; A0] and [B, -B0]: a plain LoRA delta on the original base
    tokens = token_batch()
    assert_parity(logits(theirs, tokens), logits(trained, tokens))


def test_peft_corda_adapter_converted_to_lora_loads_like_peft(tmp_path) -> None:
    theirs = peft_corda(fresh(), config(), "ipm", samples())
    theirs.save_pretrained(tmp_path / "initial")
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    theirs.save_pretrained(tmp_path / "trained", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = load_adapter(fresh(), tmp_path / "trained")
    tokens = token_batch()
    assert_parity(logits(ours, tokens), logits(theirs, tokens))


def test_unconverted_peft_corda_file_is_refused_with_the_conversion_to_make(tmp_path) -> None:
    peft_corda(fresh(), config(), "ipm", samples()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        load_adapter(fresh(), tmp_path)


def test_data_init_with_quantization_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(ValueError, match="calibration batches"):
        LoraConfig(init="corda_ipm", quantization=QuantizationConfig(bits=4))


def test_no_calibration_batches_is_an_error_and_leaves_the_adapter_pending() -> None:
    model = apply_lora(fresh(), config())
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate_adapters(model, [])
    assert not any(layer.lora_settings["default"].initialized for _, layer in lora_layers(model))

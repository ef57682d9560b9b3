"""The recipes in docs/ that users copy, run on the files the package itself writes, in both formats."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from interaction_matrix import METHODS, fit, outputs, plain_tinynet
from numerics import assert_parity

from lightning_lora import apply_lora, load_adapter, quantized_layers, read_adapter_config, save_adapter


@pytest.fixture(scope="module")
def qlora_model() -> torch.nn.Module:
    return fit(METHODS["QLoRA 8-bit"]).model


@pytest.mark.parametrize("file_format", ["peft", "lightning_lora"])
def test_continuing_qlora_from_a_file_rebuilds_the_quantised_base(
    qlora_model: torch.nn.Module, file_format: str, tmp_path: Path
) -> None:
    """docs/qlora.md: ``apply_lora(model, read_adapter_config("adapter/", model))``, then ``load_adapter``."""
    save_adapter(qlora_model, tmp_path / "adapter", format=file_format)
    model = plain_tinynet()
    config = read_adapter_config(tmp_path / "adapter", model)
    assert config.quantization == qlora_model.fc1.lora_settings["default"].config.quantization
    apply_lora(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base is quantised as trained: nothing to warn about
        load_adapter(model, tmp_path / "adapter")
    assert [name for name, _ in quantized_layers(model)] == ["fc1", "fc2"]
    assert_parity(outputs(model), outputs(qlora_model))


@pytest.mark.parametrize("file_format", ["peft", "lightning_lora"])
def test_a_qlora_file_on_an_unquantised_base_says_so(
    qlora_model: torch.nn.Module, file_format: str, tmp_path: Path
) -> None:
    save_adapter(qlora_model, tmp_path / "adapter", format=file_format)
    with pytest.warns(UserWarning, match=r"trained on a 8-bit base, and this model is not quantised.*apply_lora"):
        load_adapter(plain_tinynet(), tmp_path / "adapter")


def test_a_file_without_a_quantised_base_leaves_no_record_behind(qlora_model: torch.nn.Module, tmp_path: Path) -> None:
    save_adapter(qlora_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "lightning_lora_base.json").is_file()
    plain = fit(METHODS["LoRA"]).model
    save_adapter(plain, tmp_path / "adapter")  # the same folder, now a full-precision adapter
    assert not (tmp_path / "adapter" / "lightning_lora_base.json").exists()
    assert read_adapter_config(tmp_path / "adapter", plain_tinynet()).quantization is None


def test_a_base_record_beside_an_adapter_that_cannot_hold_it_is_refused(
    qlora_model: torch.nn.Module, tmp_path: Path
) -> None:
    save_adapter(qlora_model, tmp_path / "qlora")
    save_adapter(fit(METHODS["LoHa"]).model, tmp_path / "loha")
    record = (tmp_path / "qlora" / "lightning_lora_base.json").read_text()
    (tmp_path / "loha" / "lightning_lora_base.json").write_text(record)  # a file that contradicts itself
    with pytest.raises(ValueError, match=r"lightning_lora_base.json is not a valid record of a quantised base for this "
                                         r"LoHaConfig"):
        read_adapter_config(tmp_path / "loha", plain_tinynet())

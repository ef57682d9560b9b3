"""Grouped convolutions (``groups > 1``) under DoRA, LoHa and LoKr, against PEFT in float64.

LoHa and LoKr build their update in the grouped kernel's own shape ``[out, in / groups, *kernel]``, so it merges as
any other; DoRA keeps LoRA's layout there (``A`` reads every input channel) and PEFT's norm, so it computes and saves
like PEFT and its merge is refused by name, as PEFT refuses it. Plain LoRA on grouped convolutions is in
``test_peft_lora_variants.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import image_batch, small_convnet
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    add_weighted_adapter,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

peft = pytest.importorskip("peft")


class GroupedConv1dNet(nn.Module):
    """A grouped Conv1d (8 channels in 2 groups) between a linear stem and head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(10, 80)
        self.conv = nn.Conv1d(8, 8, 3, groups=2)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(self.stem(x).reshape(-1, 8, 10))).flatten(1))


def _model(name: str) -> nn.Module:
    if name == "conv2d":
        return small_convnet(groups=4).double()
    torch.manual_seed(0)
    return GroupedConv1dNet().eval().double()


def _input(name: str) -> torch.Tensor:
    if name == "conv2d":
        return image_batch().double()
    return torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


TARGET = {"conv2d": ["conv2"], "conv1d": ["conv"]}
# name: (our config fields, PEFT config class and fields with its non-identity init), on both models
CASES = {
    "dora": (LoraConfig, dict(r=4, alpha=8, use_dora=True), "LoraConfig",
             dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)),
    "loha": (LoHaConfig, dict(r=2, alpha=4), "LoHaConfig", dict(r=2, alpha=4, init_weights=False)),
    "loha-effective-conv": (LoHaConfig, dict(r=2, alpha=3, use_effective_conv2d=True), "LoHaConfig",
                            dict(r=2, alpha=3, use_effective_conv2d=True, init_weights=False)),
    "lokr": (LoKrConfig, dict(r=2, alpha=4), "LoKrConfig", dict(r=2, alpha=4, init_weights=False)),
    "lokr-decomposed": (LoKrConfig, dict(r=1, alpha=2, decompose_both=True, decompose_factor=2), "LoKrConfig",
                        dict(r=1, alpha=2, decompose_both=True, decompose_factor=2, init_weights=False)),
}
PAIRS = [(case, model) for case in CASES for model in TARGET]
# PEFT 0.21's CP backward builds these gradients from the other factor (test_kinds proves ours exact by gradcheck).
PEFT_WRONG_GRADIENTS = {"loha-effective-conv": ("hada_w1_a", "hada_w2_a")}


def _peft_pair(case: str, model_name: str, tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """PEFT's adapter with its random init, and ours loaded from PEFT's file."""
    *_, peft_class, peft_fields = CASES[case]
    torch.manual_seed(7)
    config = getattr(peft, peft_class)(target_modules=TARGET[model_name], **peft_fields)
    theirs = peft.get_peft_model(_model(model_name), config)
    if case == "dora":  # DoRA's magnitudes start at the norms: move them too
        with torch.no_grad():
            for name, parameter in theirs.named_parameters():
                if "lora_magnitude" in name:
                    parameter.mul_(1.5)
    theirs.save_pretrained(tmp_path / "peft")
    return theirs, load_adapter(_model(model_name), tmp_path / "peft")


def _peft_name(our_name: str) -> str:
    """PEFT's parameter name for one of ours (``conv2.lora_A.default`` -> ``...lora_A.default.weight``)."""
    layer, container, adapter = our_name.rsplit(".", 2)
    if container == "lora_magnitude":
        return f"base_model.model.{layer}.lora_magnitude_vector.{adapter}.weight"
    suffix = ".weight" if container in ("lora_A", "lora_B") else ""
    return f"base_model.model.{layer}.{container}.{adapter}{suffix}"


@pytest.mark.parametrize("case, model_name", PAIRS)
def test_a_peft_adapter_on_a_grouped_convolution_computes_and_trains_as_peft(
    case: str, model_name: str, tmp_path: Path
) -> None:
    theirs, ours = _peft_pair(case, model_name, tmp_path)
    x = _input(model_name)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    assert_parity(ours(x), theirs(x), msg="output")
    assert (ours(x) - _model(model_name)(x)).abs().max() > 1e-6  # the adapter does something (float64 parity: 1e-12)
    peft_parameters = dict(theirs.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert trained
    for name, parameter in trained:
        if name.split(".")[-2] in PEFT_WRONG_GRADIENTS.get(case, ()):
            continue
        assert_parity(parameter.grad, peft_parameters[_peft_name(name)].grad.reshape(parameter.shape), msg=name)


@pytest.mark.parametrize("case, model_name", PAIRS)
def test_our_grouped_convolution_adapter_loads_in_peft_with_our_outputs(
    case: str, model_name: str, tmp_path: Path
) -> None:
    _, ours = _peft_pair(case, model_name, tmp_path)
    with torch.no_grad():
        for parameter in ours.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05)  # now unlike PEFT's file
        expected = ours(_input(model_name))
    save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(_model(model_name), tmp_path / "ours")
    with torch.no_grad():
        assert_parity(reloaded(_input(model_name)), expected, msg="PEFT from our file")
        assert_parity(load_adapter(_model(model_name), tmp_path / "ours")(_input(model_name)), expected)


@pytest.mark.parametrize("case, model_name", [p for p in PAIRS if p[0] != "dora"])
def test_loha_and_lokr_merge_into_a_grouped_kernel_like_peft(case: str, model_name: str, tmp_path: Path) -> None:
    theirs, ours = _peft_pair(case, model_name, tmp_path)
    x = _input(model_name)
    layer = ours.get_submodule(TARGET[model_name][0])
    before, weight = ours(x).detach(), layer.weight.detach().clone()
    merge_lora(ours)
    assert layer.merged_adapters == ["default"]
    with torch.no_grad():
        assert_parity(ours(x), before, msg="merged vs unmerged")
        peft_merged = theirs.merge_and_unload()
        assert_parity(layer.weight, peft_merged.get_submodule(TARGET[model_name][0]).weight, msg="merged kernel")
    unmerge_lora(ours)
    assert_parity(layer.weight, weight, msg="unmerged kernel")


@pytest.mark.parametrize("model_name", list(TARGET))
def test_merging_dora_on_a_grouped_convolution_is_refused_by_name_and_changes_nothing(
    model_name: str, tmp_path: Path
) -> None:
    theirs, ours = _peft_pair("dora", model_name, tmp_path)
    with pytest.raises(Exception):  # PEFT refuses too
        copy.deepcopy(theirs).merge_adapter()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"grouped convolution \(groups=\d\): the DoRA update .*cannot be merged"):
        merge_lora(ours)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (OFTConfig(oft_block_size=2, target_modules=["conv2"]), r"groups=4\), which OFT cannot adapt.*LoRA, DoRA"),
        (AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["conv2"]), r"which AdaLoRA cannot adapt"),
    ],
)
def test_kinds_without_a_grouped_layout_refuse_grouped_convolutions_by_name(config, message: str) -> None:
    model = small_convnet(groups=4)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    assert type(model.conv2) is nn.Conv2d


@pytest.mark.parametrize("combination_type", ["svd", "cat", "linear"])
def test_combining_adapters_on_a_grouped_convolution_is_refused_by_name_and_changes_nothing(combination_type) -> None:
    model = small_convnet(groups=4)
    for name in ("a", "b"):
        apply_lora(model, LoHaConfig(r=2, alpha=4, target_modules=["conv2"], init_weights=False), name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"conv2 is a grouped convolution \(groups=4\): the combined adapter's LoRA"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "both", combination_type=combination_type)
    assert set(model.conv2.lora_settings) == {"a", "b"}
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)

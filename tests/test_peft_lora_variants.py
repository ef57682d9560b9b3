"""PEFT LoRA adapters that must load: a rank larger than a layer can use (PEFT allows it; an adapter on a small head)
gives a warning, and forward, merge and files both ways equal PEFT's (SVD inits still refuse: tests/test_errors.py);
an EVA-initialised adapter is the plain LoRA it is after training; a LoRA on a grouped convolution computes, trains
and saves as PEFT's and refuses to merge. Comparisons with PEFT run in float64 (to float64 rounding)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models import image_batch, randomize_adapters, small_convnet, tiny_llama, token_batch
from numerics import assert_parity
from peft_oracle import copy_adapter_into_peft, peft_twin

from lightning_lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter

peft = pytest.importorskip("peft")

# k_proj and v_proj of the tiny Llama map 32 -> 16 features: rank 24 can use 16 of its ranks.
CONFIG = LoraConfig(r=24, alpha=12, target_modules=["k_proj", "v_proj"])


def _llama64() -> torch.nn.Module:
    return tiny_llama().double()


def _ours() -> torch.nn.Module:
    with pytest.warns(UserWarning, match=r"r=24 on model.layers.0.self_attn.k_proj can use at most 16 ranks"):
        model = apply_lora(_llama64(), CONFIG)
    randomize_adapters(model)
    return model


def test_forward_and_merge_equal_peft_at_a_rank_beyond_the_layer(tmp_path: Path) -> None:
    ours = _ours()
    theirs = peft_twin(_llama64(), CONFIG)
    copy_adapter_into_peft(ours, theirs)
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert expected.dtype == torch.float64
        assert_parity(ours(input_ids=ids).logits, expected, msg="unmerged")
        assert_parity(merge_lora(ours)(input_ids=ids).logits, expected, msg="merged")


def test_files_go_both_ways_with_peft(tmp_path: Path) -> None:
    ours = _ours()
    ids = token_batch()
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert expected.dtype == torch.float64
        reloaded = peft.PeftModel.from_pretrained(_llama64(), tmp_path / "ours")
        assert_parity(reloaded(input_ids=ids).logits, expected, msg="PEFT from our file")
        reloaded.save_pretrained(tmp_path / "peft")
        with pytest.warns(UserWarning, match="can use at most 16 ranks"):
            loaded = load_adapter(_llama64(), tmp_path / "peft")
        assert_parity(loaded(input_ids=ids).logits, expected, msg="ours from PEFT's file")


def test_an_eva_initialised_peft_adapter_loads_as_the_plain_lora_it_is(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0),
        rank_pattern={"v_proj": 6}, alpha_pattern={"v_proj": 3},  # what EVA's rank redistribution writes
    )
    theirs = peft.get_peft_model(tiny_llama(), config).double()
    randomize_adapters(theirs)  # stands in for the EVA init and training
    theirs.save_pretrained(tmp_path / "eva")
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert expected.dtype == torch.float64
        assert_parity(load_adapter(_llama64(), tmp_path / "eva")(input_ids=ids).logits, expected)


# ----- grouped convolutions: A sees every input channel, B is grouped like the base (PEFT's layout); never merged -----
GROUPED = LoraConfig(r=4, alpha=8, target_modules=["conv1", "conv2"])


def _convnet64() -> torch.nn.Module:
    return small_convnet(groups=4).double()


def _grouped_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = apply_lora(_convnet64(), GROUPED)
    randomize_adapters(ours)
    theirs = peft_twin(_convnet64(), GROUPED)
    copy_adapter_into_peft(ours, theirs)
    return ours, theirs


def test_a_lora_on_a_grouped_convolution_computes_and_trains_as_peft() -> None:
    ours, theirs = _grouped_pair()
    assert ours.conv2.lora_B["default"].shape == (16, 1, 1, 1)  # r / groups input channels per output channel
    images = image_batch().double()
    ours(images).square().sum().backward()
    theirs(images).square().sum().backward()
    assert ours(images).dtype == torch.float64
    assert_parity(ours(images), theirs(images), msg="output")
    for factor in ("lora_A", "lora_B"):
        assert_parity(getattr(ours.conv2, factor)["default"].grad,
                      getattr(theirs.base_model.model.conv2, factor)["default"].weight.grad, msg=factor)


def test_a_grouped_convolution_adapter_goes_both_ways_with_peft_files(tmp_path: Path) -> None:
    ours, theirs = _grouped_pair()
    images = image_batch().double()
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = ours(images)
        assert expected.dtype == torch.float64
        from_ours = peft.PeftModel.from_pretrained(_convnet64(), tmp_path / "ours")
        assert_parity(from_ours(images), expected, msg="PEFT from our file")
        assert_parity(load_adapter(_convnet64(), tmp_path / "peft")(images), expected, msg="ours from PEFT's file")


def test_merging_a_grouped_convolution_adapter_is_refused_and_changes_nothing() -> None:
    ours, _ = _grouped_pair()
    weights = {name: p.detach().clone() for name, p in ours.named_parameters()}
    with pytest.raises(ValueError, match=r"conv2 is a grouped convolution \(groups=4\).*cannot be merged"):
        merge_lora(ours)
    assert not ours.conv1.merged_adapters and not ours.conv2.merged_adapters
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=6, target_modules=["conv2"]), r"rank divisible by 4 \(got r=6\).*rank_pattern=\{'conv2': 4\}"),
        (LoraConfig(r=4, target_modules=["conv2"], init="pissa"), r"init in \('kaiming', 'gaussian'\) \(got 'pissa'\)"),
        (LoraConfig(r=6, target_modules=["conv2"], use_dora=True), r"rank divisible by 4 \(got r=6\)"),
    ],
)
def test_what_a_grouped_convolution_cannot_take_is_refused_by_name(config: LoraConfig, message: str) -> None:
    model = small_convnet(groups=4)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    assert type(model.conv2) is torch.nn.Conv2d


# ----- mixture of experts: "all-linear" names the fused expert weights it cannot adapt -----
def test_all_linear_names_the_fused_experts_and_router_it_leaves_frozen() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"'all-linear' adapts linear layers; these weights stay frozen") as caught:
        model = apply_lora(MixtralForCausalLM(config), LoraConfig(r=2))
    message = str(next(w.message for w in caught if "all-linear" in str(w.message)))
    for weight in ("mlp.gate.weight [4, 16]", "experts.gate_up_proj [4, 48, 16]", "experts.down_proj [4, 16, 24]"):
        assert weight in message
    assert not model.model.layers[0].mlp.experts.gate_up_proj.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming the layers leaves nothing unsaid
        apply_lora(MixtralForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))

"""``lora_bias``: a trainable bias on B (PEFT's option for adapters extracted from full fine-tunes). Forward,
gradients, merge, merged export and files both ways equal PEFT's (compared in float64); what it cannot do is refused
by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import image_batch, small_convnet, tiny_bert, tiny_llama, token_batch
from numerics import assert_parity

from lightning_lora import (
    LoraConfig,
    XLoraConfig,
    add_xlora,
    apply_lora,
    load_adapter,
    load_merged_state_dict,
    merge_lora,
    save_adapter,
    save_merged_model,
    unmerge_lora,
)

peft = pytest.importorskip("peft")

BERT = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], lora_bias=True)
CONV = LoraConfig(r=4, alpha=8, target_modules=["conv1", "conv2"], lora_bias=True)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 3) -> None:
    """Random values in every adapter tensor, the biases on B included (they start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _pair(base, config: LoraConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and PEFT's with the same adapter tensors, in float64."""
    ours = apply_lora(base().double(), config)
    _randomize(ours)
    theirs = peft.get_peft_model(base().double(), peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules, lora_bias=True))
    # PEFT's lora_B is an nn.Linear/Conv whose bias is our lora_bias.
    theirs_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, module in ours.named_modules():
            if hasattr(module, "lora_bias"):
                twin = theirs_modules[name]
                twin.lora_A["default"].weight.copy_(module.lora_A["default"])
                twin.lora_B["default"].weight.copy_(module.lora_B["default"])
                twin.lora_B["default"].bias.copy_(module.lora_bias["default"])
    return ours, theirs


CASES = {
    "bert": (tiny_bert, BERT, lambda: {"input_ids": token_batch()}, lambda out: out.logits),
    "convnet": (small_convnet, CONV, lambda: {"x": image_batch().double()}, lambda out: out),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_gradients_and_merge_equal_peft(case: str) -> None:
    base, config, inputs, logits = CASES[case]
    ours, theirs = _pair(base, config)
    batch = inputs()
    assert torch.count_nonzero(ours.state_dict()[next(k for k in ours.state_dict() if "lora_bias" in k)])
    expected = logits(theirs(**batch))
    got = logits(ours(**batch))
    assert got.dtype == expected.dtype == torch.float64
    assert_parity(got, expected, msg="output")
    got.square().sum().backward()
    expected.square().sum().backward()
    theirs_modules = dict(theirs.base_model.model.named_modules())
    for name, module in ours.named_modules():
        if hasattr(module, "lora_bias"):
            assert_parity(module.lora_bias["default"].grad, theirs_modules[name].lora_B["default"].bias.grad, msg=name)
    with torch.no_grad():
        theirs.merge_adapter()
        merged = logits(merge_lora(ours)(**batch))
        assert_parity(merged, logits(theirs(**batch)), msg="merged vs PEFT merged")
        assert_parity(merged, got, msg="merged vs unmerged")


def test_unmerge_restores_the_base_bias() -> None:
    model = apply_lora(tiny_bert(), BERT)
    _randomize(model)
    query = model.bert.encoder.layer[0].attention.self.query
    bias_before = query.bias.detach().clone()
    merge_lora(model)
    assert not torch.allclose(query.bias, bias_before)
    unmerge_lora(model)
    assert_parity(query.bias, bias_before)


def test_files_go_both_ways_with_peft(tmp_path: Path) -> None:
    ours, theirs = _pair(tiny_bert, BERT)
    ids = token_batch()
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert expected.dtype == torch.float64
        from_ours = peft.PeftModel.from_pretrained(tiny_bert().double(), tmp_path / "ours")
        assert_parity(from_ours(input_ids=ids).logits, expected, msg="PEFT from our file")
        loaded = load_adapter(tiny_bert().double(), tmp_path / "peft")
        assert loaded.bert.encoder.layer[0].attention.self.value.lora_settings["default"].config.lora_bias
        assert_parity(loaded(input_ids=ids).logits, expected, msg="ours from PEFT's file")


def test_the_merged_export_carries_the_bias(tmp_path: Path) -> None:
    model = apply_lora(tiny_bert(), BERT)
    _randomize(model)
    save_merged_model(model, tmp_path)
    fresh = tiny_bert(seed=5)
    fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
    ids = token_batch()
    with torch.no_grad():
        assert_parity(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_merging_into_a_layer_without_bias_is_refused_and_changes_nothing() -> None:
    with pytest.warns(UserWarning, match="has no bias: the adapter trains, but it cannot be merged"):
        model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    _randomize(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"q_proj has no bias, so the bias on B of \['default'\]"):
        merge_lora(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LoraConfig(lora_bias=True, use_dora=True), r"not with use_dora=True"),
        (lambda: LoraConfig(lora_bias=True, init="pissa"), r"not with init='pissa'"),
        (lambda: LoraConfig(lora_bias="yes"), r"lora_bias must be True or False"),
        (lambda: apply_lora(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], lora_bias=True)),
         r"does not apply to model.embed_tokens \(nn.Embedding\)"),
    ],
)
def test_what_lora_bias_cannot_do_is_refused_by_name(build, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_vllm_export_and_xlora_refuse_a_bias_on_b(tmp_path: Path) -> None:
    model = apply_lora(tiny_bert(), BERT)
    with pytest.raises(ValueError, match=r"this adapter has a bias on B \(lora_bias=True\)"):
        save_adapter(model, tmp_path / "vllm", format="vllm")
    assert not (tmp_path / "vllm").exists()
    with pytest.raises(ValueError, match=r"'default' is a LoRA with a bias on B"):
        add_xlora(model, ["default"], XLoraConfig(hidden_size=32))

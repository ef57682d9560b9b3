"""PEFT LoRA adapters that must load: a rank larger than a layer can use (PEFT allows it; an adapter on a small head)
gives a warning, and forward, merge and files both ways equal PEFT's (SVD inits still refuse: tests/test_errors.py);
an EVA-initialised adapter is the plain LoRA it is after training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import randomize_adapters, tiny_llama, token_batch
from peft_oracle import copy_adapter_into_peft, peft_twin

from lightning_lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter

peft = pytest.importorskip("peft")

# k_proj and v_proj of the tiny Llama map 32 -> 16 features: rank 24 can use 16 of its ranks.
CONFIG = LoraConfig(r=24, alpha=12, target_modules=["k_proj", "v_proj"])


def _ours() -> torch.nn.Module:
    with pytest.warns(UserWarning, match=r"r=24 on model.layers.0.self_attn.k_proj can use at most 16 ranks"):
        model = apply_lora(tiny_llama(), CONFIG)
    randomize_adapters(model)
    return model


def test_forward_and_merge_equal_peft_at_a_rank_beyond_the_layer(tmp_path: Path) -> None:
    ours = _ours()
    theirs = peft_twin(tiny_llama(), CONFIG)
    copy_adapter_into_peft(ours, theirs)
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merge_lora(ours)(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_files_go_both_ways_with_peft(tmp_path: Path) -> None:
    ours = _ours()
    ids = token_batch()
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        reloaded.save_pretrained(tmp_path / "peft")
        with pytest.warns(UserWarning, match="can use at most 16 ranks"):
            loaded = load_adapter(tiny_llama(), tmp_path / "peft")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_an_eva_initialised_peft_adapter_loads_as_the_plain_lora_it_is(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0),
        rank_pattern={"v_proj": 6}, alpha_pattern={"v_proj": 3},  # what EVA's rank redistribution writes
    )
    theirs = peft.get_peft_model(tiny_llama(), config)
    randomize_adapters(theirs)  # stands in for the EVA init and training
    theirs.save_pretrained(tmp_path / "eva")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path / "eva")(input_ids=ids).logits,
                                   theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-4)

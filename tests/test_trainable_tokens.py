"""``trainable_token_indices``: a LoRA adapter that also trains chosen embedding rows (new special tokens). Forward,
gradients, merge and files both ways equal PEFT's (compared in float64, to float64 rounding); only the chosen rows
change; bad input is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity
from peft_oracle import copy_adapter_into_peft

from lightning_lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    load_merged_state_dict,
    merge_lora,
    save_adapter,
    save_merged_model,
    unmerge_lora,
)

peft = pytest.importorskip("peft")

TOKENS = [1, 5, 7]
CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKENS)
PEFT_DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"


def _ids() -> torch.Tensor:
    ids = token_batch()
    ids[0, :3] = torch.tensor(TOKENS)  # the chosen tokens, beside others
    return ids


def _llama64() -> torch.nn.Module:
    return tiny_llama().double()


def _pair(dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = apply_lora(tiny_llama().to(dtype), CONFIG)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs = peft.get_peft_model(tiny_llama().to(dtype), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKENS))
    copy_adapter_into_peft(ours, theirs)
    with torch.no_grad():
        theirs.state_dict()[PEFT_DELTA].copy_(ours.model.embed_tokens.trainable_tokens_delta["default"])
    return ours, theirs


def test_only_the_chosen_rows_train_and_start_as_the_base_rows() -> None:
    base = tiny_llama()
    model = apply_lora(tiny_llama(), CONFIG)
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    torch.testing.assert_close(rows, base.model.embed_tokens.weight[TOKENS], rtol=0, atol=0)
    assert rows.requires_grad and not model.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        assert_parity(model(input_ids=_ids()).logits, base(input_ids=_ids()).logits)


def test_a_training_step_moves_the_chosen_rows_only() -> None:
    model = apply_lora(tiny_llama(), CONFIG)
    table = model.model.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=_ids()).logits.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        effective = model.model.embed_tokens(torch.arange(96))
    moved = (effective != table).any(dim=1).nonzero().flatten().tolist()
    assert moved == TOKENS
    torch.testing.assert_close(model.model.embed_tokens.weight, table, rtol=0, atol=0)


def test_forward_gradients_and_merge_equal_peft() -> None:
    ours, theirs = _pair()
    ids = _ids()
    got, expected = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert got.dtype == expected.dtype == torch.float64
    assert_parity(got, expected, msg="logits")
    got.square().sum().backward()
    expected.square().sum().backward()
    theirs_rows = dict(theirs.named_parameters())[PEFT_DELTA]
    assert_parity(ours.model.embed_tokens.trainable_tokens_delta["default"].grad, theirs_rows.grad, msg="rows' grad")
    with torch.no_grad():
        table = ours.model.embed_tokens.weight.detach().clone()
        merged = merge_lora(ours)(input_ids=ids).logits
        assert_parity(merged, got, msg="merged")
        changed = (ours.model.embed_tokens.weight != table).any(dim=1).nonzero().flatten().tolist()
        assert changed == TOKENS
        unmerge_lora(ours)
        torch.testing.assert_close(ours.model.embed_tokens.weight, table, rtol=0, atol=0)


def test_files_go_both_ways_with_peft(tmp_path: Path) -> None:
    ours, theirs = _pair()
    ids = _ids()
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert expected.dtype == torch.float64
        from_ours = peft.PeftModel.from_pretrained(_llama64(), tmp_path / "ours")
        assert_parity(from_ours(input_ids=ids).logits, expected, msg="PEFT from our file")
        loaded = load_adapter(_llama64(), tmp_path / "peft")
        assert_parity(loaded(input_ids=ids).logits, expected, msg="ours from PEFT's file")
        native = load_adapter(_llama64(), save_adapter(ours, tmp_path / "native", format="lightning_lora"))
        assert_parity(native(input_ids=ids).logits, expected, msg="ours from our native file")
        native.model.embed_tokens.trainable_tokens_delta["default"].zero_()
        load_adapter(native, tmp_path / "peft")  # into the model's own adapter: the rows come back
        assert_parity(native(input_ids=ids).logits, expected, msg="PEFT's file into the native adapter")


def test_the_merged_export_carries_the_rows(tmp_path: Path) -> None:
    ours, _ = _pair(torch.float32)
    save_merged_model(ours, tmp_path)
    fresh = tiny_llama(seed=3)
    fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
    with torch.no_grad():
        assert_parity(fresh(input_ids=_ids()).logits, ours(input_ids=_ids()).logits)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LoraConfig(trainable_token_indices=[1, 1]), r"distinct token ids >= 0, got \[1, 1\]"),
        (lambda: LoraConfig(trainable_token_indices={"embed_tokens": []}), r"\['embed_tokens'\] must be a non-empty"),
        (lambda: apply_lora(tiny_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 500])),
         r"\[500\] are beyond its 96 rows; resize the embeddings"),
        (lambda: apply_lora(tiny_llama(), LoraConfig(target_modules=["q_proj"],
                                                     trainable_token_indices={"q_proj": [1]})),
         r"it must name exactly one nn.Embedding"),
        (lambda: apply_lora(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                     trainable_token_indices=[1])),
         r"model.embed_tokens is in trainable_token_indices and in target_modules"),
    ],
)
def test_bad_token_choices_are_refused_by_name_and_change_nothing(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_a_head_tied_to_the_embedding_uses_the_new_rows_as_peft(tmp_path: Path) -> None:
    config = LoraConfig(r=4, alpha=8, target_modules=["c_attn"], trainable_token_indices=TOKENS)
    ours = apply_lora(tiny_gpt2().double(), config)
    assert not ours.lm_head.adapter_containers("default")  # the rows live once, on the embedding
    rows = ours.transformer.wte.trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.add_(torch.randn_like(rows))
    theirs = peft.get_peft_model(tiny_gpt2().double(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], trainable_token_indices=TOKENS))
    copy_adapter_into_peft(ours, theirs)
    key = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default"
    with torch.no_grad():
        theirs.state_dict()[key].copy_(rows)
    ids = _ids()
    got, expected = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert got.dtype == expected.dtype == torch.float64
    assert_parity(got, expected, msg="logits")
    got.square().sum().backward()
    expected.square().sum().backward()
    assert_parity(rows.grad, dict(theirs.named_parameters())[key].grad, msg="rows' grad")
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        from_ours = peft.PeftModel.from_pretrained(tiny_gpt2().double(), tmp_path / "ours")
        assert_parity(from_ours(input_ids=ids).logits, got, msg="PEFT from our file")
        assert_parity(load_adapter(tiny_gpt2().double(), tmp_path / "peft")(input_ids=ids).logits, got,
                      msg="ours from PEFT's file")
    with pytest.raises(ValueError, match=r"transformer.wte shares its weight with \['lm_head'\]"):
        merge_lora(ours)  # in place it would change both (save_merged_model writes them untied)


def test_vllm_export_refuses_trained_rows(tmp_path: Path) -> None:
    ours, _ = _pair()
    with pytest.raises(ValueError, match=r"trains embedding rows \(trainable_token_indices\)"):
        save_adapter(ours, tmp_path / "vllm", format="vllm")
    assert not (tmp_path / "vllm").exists()

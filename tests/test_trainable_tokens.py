"""``trainable_token_indices``: a LoRA adapter that also trains chosen embedding rows (new special tokens). Forward,
gradients, merge and files both ways equal PEFT's; only the chosen rows change; bad input is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import tiny_gpt2, tiny_llama, token_batch
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


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = apply_lora(tiny_llama(), CONFIG)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
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
        torch.testing.assert_close(model(input_ids=_ids()).logits, base(input_ids=_ids()).logits)


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
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    got.square().sum().backward()
    expected.square().sum().backward()
    theirs_rows = dict(theirs.named_parameters())[PEFT_DELTA]
    torch.testing.assert_close(ours.model.embed_tokens.trainable_tokens_delta["default"].grad, theirs_rows.grad,
                               atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        table = ours.model.embed_tokens.weight.detach().clone()
        merged = merge_lora(ours)(input_ids=ids).logits
        torch.testing.assert_close(merged, got, atol=1e-5, rtol=1e-4)
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
        from_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
        torch.testing.assert_close(from_ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        loaded = load_adapter(tiny_llama(), tmp_path / "peft")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        native = load_adapter(tiny_llama(), save_adapter(ours, tmp_path / "native", format="lightning_lora"))
        torch.testing.assert_close(native(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        native.model.embed_tokens.trainable_tokens_delta["default"].zero_()
        load_adapter(native, tmp_path / "peft")  # into the model's own adapter: the rows come back
        torch.testing.assert_close(native(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_the_merged_export_carries_the_rows(tmp_path: Path) -> None:
    ours, _ = _pair()
    save_merged_model(ours, tmp_path)
    fresh = tiny_llama(seed=3)
    fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=_ids()).logits, ours(input_ids=_ids()).logits,
                                   atol=1e-5, rtol=1e-4)


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
    ours = apply_lora(tiny_gpt2(), config)
    assert not ours.lm_head.adapter_containers("default")  # the rows live once, on the embedding
    rows = ours.transformer.wte.trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.add_(torch.randn_like(rows))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], trainable_token_indices=TOKENS))
    copy_adapter_into_peft(ours, theirs)
    key = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default"
    with torch.no_grad():
        theirs.state_dict()[key].copy_(rows)
    ids = _ids()
    got, expected = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    got.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(rows.grad, dict(theirs.named_parameters())[key].grad, atol=1e-5, rtol=1e-4)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        from_ours = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")
        torch.testing.assert_close(from_ours(input_ids=ids).logits, got, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(load_adapter(tiny_gpt2(), tmp_path / "peft")(input_ids=ids).logits, got,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"transformer.wte shares its weight with \['lm_head'\]"):
        merge_lora(ours)  # in place it would change both (save_merged_model writes them untied)


def test_vllm_export_refuses_trained_rows(tmp_path: Path) -> None:
    ours, _ = _pair()
    with pytest.raises(ValueError, match=r"trains embedding rows \(trainable_token_indices\)"):
        save_adapter(ours, tmp_path / "vllm", format="vllm")
    assert not (tmp_path / "vllm").exists()

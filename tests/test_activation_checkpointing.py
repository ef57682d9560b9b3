"""Activation checkpointing with adapters: Hugging Face's ``gradient_checkpointing_enable`` (reentrant or not) and
torch's ``checkpoint_wrapper`` (the FSDP2 way) recompute the adapted layers in backward and give the gradients of a
run without checkpointing."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from models import randomize_adapters, tiny_llama, token_batch
from numerics import assert_parity
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from lightning_lora import LoHaConfig, LoraConfig, apply_lora
from lightning_lora.core.common.distributed import clean_name  # drops checkpoint_wrapper's prefix

CONFIGS = {
    "lora": LoraConfig(r=4, target_modules="all-linear"),
    "dora": LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "loha": LoHaConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def _gradients(config: Any, checkpointing: Callable[[nn.Module], None]) -> tuple[dict[str, torch.Tensor], int]:
    """Adapter gradients of one step, and how often the first adapted attention projection ran forward."""
    model = apply_lora(tiny_llama(), config)
    randomize_adapters(model)
    checkpointing(model)
    model.train()
    calls = [0]
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ids = token_batch()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {clean_name(name): p.grad for name, p in model.named_parameters() if p.requires_grad}, calls[0]


def _hf(reentrant: bool) -> Callable[[nn.Module], None]:
    return lambda model: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _wrapped_decoder_layers(model: nn.Module) -> None:
    layer_class = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, layer_class))


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("checkpointing", ["hf-reentrant", "hf-non-reentrant", "checkpoint_wrapper"])
def test_checkpointed_gradients_equal_the_plain_run(kind: str, checkpointing: str) -> None:
    how = {"hf-reentrant": _hf(True), "hf-non-reentrant": _hf(False), "checkpoint_wrapper": _wrapped_decoder_layers}
    expected, plain_calls = _gradients(CONFIGS[kind], lambda model: None)
    actual, calls = _gradients(CONFIGS[kind], how[checkpointing])
    assert plain_calls == 1 and calls == 2  # recomputed in backward
    assert actual.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert actual[name] is not None, name
        assert_parity(actual[name], grad, msg=name)


def test_the_checkpointed_tiny_net_of_the_distributed_runs_recomputes_its_adapted_layers() -> None:
    from lightning_models import TinyNet, lora_config

    model = apply_lora(TinyNet(), lora_config())
    model.checkpointed = True  # as tests/distributed/kind_runs.py's CheckpointedInit
    calls = [0]
    model.fc1.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # recompute may stop early
    model(torch.randn(3, 8)).sum().backward()
    assert calls[0] == 2 and model.fc1.lora_B["default"].grad is not None

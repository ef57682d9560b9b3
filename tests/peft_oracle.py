"""HF PEFT as a numerical oracle: build the same adapter in PEFT and copy our adapter tensors into it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_lora import LoraConfig, adapter_state_dict


def peft_lora_config(config: LoraConfig, init_lora_weights=True) -> Any:
    """PEFT's ``LoraConfig`` configured like ours (``init_lora_weights``: PEFT's init, e.g. ``"pissa"``)."""
    import peft

    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        modules_to_save=config.modules_to_save,
        bias=config.bias,
        init_lora_weights=init_lora_weights,
    )


def peft_twin(base: nn.Module, config: LoraConfig, adapter_name: str = "default", init_lora_weights=True) -> nn.Module:
    """A PEFT LoRA model over a deep copy of ``base`` configured like ``config`` (``init_lora_weights``: PEFT's
    init, e.g. ``"pissa"``)."""
    import peft

    peft_config = peft_lora_config(config, init_lora_weights)
    return peft.get_peft_model(copy.deepcopy(base), peft_config, adapter_name=adapter_name)


def peft_key(our_key: str, adapter_name: str, peft_state: dict[str, torch.Tensor]) -> str:
    """Map one of our adapter keys to the matching key of a PEFT model's state dict."""
    prefix = "base_model.model."
    module_path, kind, name = our_key.rsplit(".", 2)
    assert name == adapter_name, our_key
    candidates = {
        "lora_A": [f"{module_path}.lora_A.{name}.weight", f"{module_path}.lora_embedding_A.{name}"],
        "lora_B": [f"{module_path}.lora_B.{name}.weight", f"{module_path}.lora_embedding_B.{name}"],
        "lora_magnitude": [f"{module_path}.lora_magnitude_vector.{name}.weight"],
    }[kind]
    for candidate in candidates:
        if prefix + candidate in peft_state:
            return prefix + candidate
    raise KeyError(f"no PEFT key for {our_key}; tried {candidates}")


@torch.no_grad()
def copy_adapter_into_peft(ours: nn.Module, theirs: nn.Module, adapter_name: str = "default") -> None:
    peft_state = theirs.state_dict()
    for key, value in adapter_state_dict(ours, adapter_name).items():
        if ".lora_" not in key:
            continue
        target = peft_state[peft_key(key, adapter_name, peft_state)]
        target.copy_(value.reshape(target.shape))


def peft_adapter_grads(theirs: nn.Module, ours_keys: list[str], adapter_name: str = "default") -> dict:
    params = dict(theirs.named_parameters())
    state = theirs.state_dict()
    return {k: params[peft_key(k, adapter_name, state)].grad for k in ours_keys}

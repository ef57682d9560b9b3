"""Which adapters a model holds and which take part in forward, and the non-adapter state that trains and is saved
with them (``modules_to_save``, trained biases)."""

from __future__ import annotations

from typing import Iterator, Union

import torch
from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_tensors import adapter_parameters

# Marks modules whose own state trains and is saved with an adapter: {adapter: ("bias",)} for a trained bias,
# {adapter: ()} for a whole module in modules_to_save.
SAVED_WITH = "_lora_saved_with"
WHOLE_MODULE: tuple[str, ...] = ()


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in the order they were added.

    Args:
        model: Any module.
    """
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_settings))
    return list(names)


def get_lora_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    """The config an adapter was created with (a ``LoraConfig`` or another kind's config).

    Args:
        model: A model with LoRA adapters.
        adapter_name: Which adapter.

    Raises:
        ValueError: The model has no adapter of that name.
    """
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            return layer.lora_settings[adapter_name].config
    raise ValueError(f"The model has no adapter {adapter_name!r}; it has {adapter_names(model)}.")


def check_known_adapters(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; the model has {known}.")


def set_active_adapters(model: nn.Module, names: Union[str, list[str]]) -> nn.Module:
    """Choose which adapters take part in forward (in this order). Trainability is not changed.

    Args:
        model: A model with LoRA adapters.
        names: One adapter name or a list of them.
    """
    names = [names] if isinstance(names, str) else list(names)
    check_known_adapters(model, names)
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_settings]
    return model


def mark_saved_modules(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    modules_to_save: dict[str, nn.Module],
    adapted: list[nn.Module],
) -> None:
    for module in modules_to_save.values():
        _marks(module)[adapter_name] = WHOLE_MODULE
    if config.bias == "none":
        return
    with_bias = adapted if config.bias == "lora_only" else list(model.modules())
    for module in with_bias:
        if isinstance(getattr(module, "bias", None), nn.Parameter) and adapter_name not in _marks(module):
            _marks(module)[adapter_name] = ("bias",)


def _marks(module: nn.Module) -> dict[str, tuple[str, ...]]:
    if SAVED_WITH not in module.__dict__:
        module.__dict__[SAVED_WITH] = {}
    return module.__dict__[SAVED_WITH]


def saved_module_state(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(state-dict key, tensor)`` of the non-adapter state that trains with ``adapter_name`` (modules_to_save,
    trained biases)."""
    for name, module in model.named_modules():
        local = getattr(module, SAVED_WITH, {}).get(adapter_name)
        if local is None:
            continue
        prefix = f"{name}." if name else ""
        if local == WHOLE_MODULE:
            for key, value in module.state_dict().items():
                yield prefix + key, value
        else:
            for attribute in local:
                yield prefix + attribute, getattr(module, attribute)


def mark_only_adapters_trainable(model: nn.Module, adapter_names: Union[str, list[str]]) -> nn.Module:
    """Freeze every parameter, then unfreeze the tensors of the given adapters and the state saved with them.

    Args:
        model: A model with LoRA adapters.
        adapter_names: The adapter (or adapters) to train.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for adapter_name in names:
        for _, parameter in adapter_parameters(model, adapter_name, include_frozen=False):
            parameter.requires_grad_(True)
    for module in model.modules():
        for adapter_name in names:
            local = getattr(module, SAVED_WITH, {}).get(adapter_name)
            if local == WHOLE_MODULE:
                module.requires_grad_(True)
            elif local:
                for attribute in local:
                    getattr(module, attribute).requires_grad_(True)
    return model

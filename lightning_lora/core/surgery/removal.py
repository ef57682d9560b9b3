"""Taking adapters away again: one adapter from a model or a layer, or every adapter at once."""

from __future__ import annotations

from torch import nn

from lightning_lora.core.kinds import ADAPTER_CONTAINERS
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import SAVED_WITH, check_known_adapters
from lightning_lora.core.layers.containers import SharedTensors
from lightning_lora.core.layers.parameter_adapters import ParameterAdapters, release_parameter


def remove_adapter_tensors(layer: LoraLayer, adapter_name: str) -> None:
    """Drop one adapter's tensors and settings from a layer (the layer keeps its class)."""
    for dict_name in ADAPTER_CONTAINERS:
        container = layer._modules.get(dict_name)
        if container is None:
            continue
        if adapter_name in container:
            del container[adapter_name]  # a SharedTensors holder: for every layer at once
        if not len(container):
            del layer._modules[dict_name]  # no empty containers left behind by another kind's adapter
    layer.lora_settings.pop(adapter_name, None)
    layer.merge_state.pop(adapter_name, None)
    if adapter_name in layer.active_adapters:
        layer.active_adapters.remove(adapter_name)


_LORA_ATTRIBUTES = (
    "lora_settings",
    "active_adapters",
    "merged_adapters",
    "adapters_disabled",
    "merge_state",
)


def restore_base_class(layer: LoraLayer) -> nn.Module:
    """Turn a LoRA layer back into its plain base class (adapters dropped, weights as they are); a parameter's
    site leaves its owner."""
    if isinstance(layer, ParameterAdapters):
        release_parameter(layer)
        return layer
    for dict_name in ADAPTER_CONTAINERS:
        layer._modules.pop(dict_name, None)
        layer.__dict__.pop(dict_name, None)  # a trainable shared holder it refers to
    for attribute in _LORA_ATTRIBUTES:
        layer.__dict__.pop(attribute, None)
    layer.__class__ = layer.base_class
    return layer


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one adapter; layers left without adapters become plain modules again.

    A base weight that holds the residual of an SVD init (PiSSA, OLoRA, ...) gets the adapter's initial part back.

    Args:
        model: A model with LoRA adapters.
        adapter_name: The adapter to remove.

    Raises:
        ValueError: Unknown adapter, or the adapter is merged (call ``unmerge_lora`` first).
    """
    check_known_adapters(model, [adapter_name])
    merged = [name for name, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"Adapter {adapter_name!r} is merged into {merged[:3]}...; call unmerge_lora(model) first.")
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            layer.lora_settings[adapter_name].kind.release_base(layer, adapter_name)
            remove_adapter_tensors(layer, adapter_name)
            if not layer.lora_settings:
                restore_base_class(layer)
    for module in model.modules():
        getattr(module, SAVED_WITH, {}).pop(adapter_name, None)
    drop_unused_shared(model)
    return model


def drop_unused_shared(model: nn.Module) -> None:
    """Take the trainable shared tensors of adapters that no layer has any more off the modules holding them, and
    holders left empty off the model and its layers."""
    present = {name for _, layer in lora_layers(model) for name in layer.lora_settings}
    for module in model.modules():
        for container, holder in list(module._modules.items()):
            if isinstance(holder, SharedTensors) and holder.trainable:
                for name in [name for name in holder.keys() if name not in present]:
                    del holder[name]
                if not len(holder):
                    del module._modules[container]
    for _, layer in lora_layers(model):
        for container in [c for c, h in layer.__dict__.items() if isinstance(h, SharedTensors) and not len(h)]:
            del layer.__dict__[container]


def remove_layer_adapter(layer: LoraLayer, adapter_name: str) -> nn.Module:
    """Take one adapter off one layer, as it is (EVA's rank-0 layers); a layer left without adapters becomes its
    plain base class again. Returns the layer."""
    remove_adapter_tensors(layer, adapter_name)
    getattr(layer, SAVED_WITH, {}).pop(adapter_name, None)  # a bias trained with it (bias="lora_only")
    return restore_base_class(layer) if not layer.lora_settings else layer


def strip_adapters(model: nn.Module) -> nn.Module:
    """Drop every adapter and saved-module mark as they are (merged deltas stay in the weights)."""
    for _, layer in lora_layers(model):
        restore_base_class(layer)
    for module in model.modules():
        module.__dict__.pop(SAVED_WITH, None)
    drop_unused_shared(model)
    return model

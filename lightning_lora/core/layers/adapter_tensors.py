"""Which tensors belong to an adapter: its per-layer tensors (state-dict keys, trainability) and those it holds once
per model, and the DeepSpeed ZeRO-3 registration that makes them gather with their layers."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.containers import SharedTensors


def layer_shared_holders(layer: nn.Module) -> dict[str, SharedTensors]:
    """``{container: holder}`` of the :class:`SharedTensors` a layer uses: children of the layer (frozen ones) and
    those it refers to without owning them (trainable ones, held by a module containing the layer)."""
    return {
        container: holder
        for container, holder in (*layer._modules.items(), *layer.__dict__.items())
        if isinstance(holder, SharedTensors)
    }


def shared_holder(model: nn.Module, container: str) -> Optional[SharedTensors]:
    """The model's :class:`SharedTensors` for ``container`` (e.g. ``"vera_A"``), or None."""
    return next((h for _, layer in lora_layers(model) if (h := layer_shared_holders(layer).get(container))), None)


def shared_adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{container: tensor}`` of the frozen tensors ``adapter_name`` holds once for all its layers (VeRA's
    projections; trainable ones are among :func:`adapter_parameters`)."""
    found: dict[str, torch.Tensor] = {}
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            for container, holder in layer_shared_holders(layer).items():
                if not holder.trainable and adapter_name in holder:
                    found.setdefault(container, holder[adapter_name])
    return found


def shared_parameters(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """``(state-dict key, parameter)`` of the trainable tensors ``adapter_name`` holds once for all its layers
    (VB-LoRA's vector bank), keyed under the module that holds them (``vblora_vector_bank.<adapter>``)."""
    for name, module in model.named_modules():
        for container, holder in module._modules.items():
            if isinstance(holder, SharedTensors) and holder.trainable and adapter_name in holder:
                key = f"{container}.{adapter_name}"
                yield f"{name}.{key}" if name else key, holder[adapter_name]


def adapter_parameters(
    model: nn.Module, adapter_name: str, include_frozen: bool = True
) -> Iterator[tuple[str, nn.Parameter]]:
    """``(state-dict key, parameter)`` of every tensor of one adapter in the adapted layers of ``model``, then the
    trainable tensors it holds once for all its layers (:func:`shared_parameters`).

    Args:
        model: A model with adapters.
        adapter_name: Which adapter.
        include_frozen: Also the tensors saved with the adapter that never train (the kind declares them frozen,
            e.g. LoRA's initial SVD factors ``lora_init_A``/``lora_init_B``).
    """
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            prefix = f"{name}." if name else ""
            settings = layer.lora_settings[adapter_name]
            trainable = {t.name for t in settings.kind.tensors(layer, settings) if t.trainable}
            for container in layer.adapter_containers(adapter_name):
                if include_frozen or container in trainable:
                    yield f"{prefix}{container}.{adapter_name}", getattr(layer, container)[adapter_name]
    yield from shared_parameters(model, adapter_name)


def adapter_tensors(model: nn.Module) -> Iterator[tuple[LoraLayer, nn.Parameter]]:
    """``(adapted layer, tensor)`` for every tensor of every adapter in ``model``."""
    for _, layer in lora_layers(model):
        for adapter_name in layer.lora_settings:
            for container in layer.adapter_containers(adapter_name):
                yield layer, getattr(layer, container)[adapter_name]


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Make DeepSpeed ZeRO-3 gather adapter tensors when their adapted layer runs.

    ZeRO-3 gathers the parameters of a module just before that module's forward. Adapter tensors live in child
    ``nn.ParameterDict`` containers whose forward never runs, so they are registered as external parameters of the
    layer that uses them. ``LoraCallback`` does this under ZeRO-3; a plain loop calls it after ``apply_lora`` and
    before ``deepspeed.initialize``.

    Args:
        model: The model with adapters.

    Returns:
        How many tensors were registered.
    """
    import deepspeed  # `deepspeed.zero` is an attribute of the package, not an importable module

    count = 0
    for layer, tensor in adapter_tensors(model):
        deepspeed.zero.register_external_parameter(layer, tensor)
        count += 1
    return count

"""Folding adapters into the base weights and back out."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_lora.core.base_weights import assign_dense_weight, dense_weight
from lightning_lora.core.inject import strip_adapters
from lightning_lora.core.layers import LoraLayer, lora_layers
from lightning_lora.core.variants import VARIANTS


def _merge_plan(model: nn.Module, adapter_names: Optional[list[str]]) -> list[tuple[str, LoraLayer, list[str]]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA adapters to merge; add them with apply_lora(model, config).")
    if adapter_names is not None:
        known = {a for _, layer in layers for a in layer.lora_settings}
        unknown = [a for a in adapter_names if a not in known]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; the model has {sorted(known)}.")
    plan = []
    for name, layer in layers:
        wanted = layer.active_adapters if adapter_names is None else adapter_names
        pending = [a for a in wanted if a in layer.lora_settings and a not in layer.merged_adapters]
        # DoRA rescales everything computed before it, so a merge is only equivalent when it acts alone.
        involved = set(pending) | set(layer.merged_adapters) | set(layer.active_adapters)
        uses_dora = any(layer.lora_settings[a].variant == "dora" for a in involved)
        if pending and uses_dora and len(involved) > 1:
            raise ValueError(
                f"{name}: a DoRA adapter can only be merged when it is the layer's only active or merged adapter "
                f"(it has {sorted(involved)}): choose one with set_active_adapters(model, name) and unmerge_lora(model) "
                "first."
            )
        if pending:
            plan.append((name, layer, pending))
    return plan


def _refuse_tied_weights(model: nn.Module, plan: list[tuple[str, LoraLayer, list[str]]]) -> None:
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module_name)
    for name, layer, _ in plan:
        sharing = [n for n in owners.get(id(layer.weight), []) if n != name]
        if sharing:
            raise ValueError(
                f"{name} shares its weight with {sharing} (tied weights, e.g. tied input/output embeddings): merging "
                "in place would change both. Leave it out of target_modules, untie the weights before apply_lora, or "
                "write a merged copy with save_merged_model (which unties them)."
            )


def merge_lora(model: nn.Module, adapter_names: Optional[list[str]] = None, safe: bool = True) -> nn.Module:
    """Fold adapters into the base weights, in place; forward then costs what the base model costs.

    Args:
        model: A model with LoRA adapters.
        adapter_names: Adapters to merge; default: the active ones.
        safe: First compute every merged weight and check it is finite; on NaN/Inf raise before any weight is
            written. With ``safe=False`` weights are written as they are computed (half the compute).

    Raises:
        ValueError: No adapters, a merged weight that is not finite (nothing is changed), or DoRA adapters that
            cannot be merged together.
    """
    plan = _merge_plan(model, adapter_names)
    _refuse_tied_weights(model, plan)
    if safe:
        for name, layer, pending in plan:
            weight = dense_weight(layer)
            for adapter in pending:
                weight = VARIANTS[layer.lora_settings[adapter].variant].merged_weight(layer, adapter, weight, {})
                if not torch.isfinite(weight).all():
                    raise ValueError(
                        f"Merging adapter {adapter!r} into {name or 'the model'} gives NaN/Inf weights; nothing was "
                        "merged. The adapter is broken (diverged training?): check its tensors and learning rate."
                    )
    for _, layer, pending in plan:
        weight = dense_weight(layer)
        for adapter in pending:
            variant = VARIANTS[layer.lora_settings[adapter].variant]
            weight = variant.merged_weight(layer, adapter, weight, layer.merge_state)
            layer.merged_adapters.append(adapter)
        assign_dense_weight(layer, weight)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights (exact up to floating-point rounding).

    Args:
        model: A model with merged LoRA adapters.
    """
    for _, layer in lora_layers(model):
        if not layer.merged_adapters:
            continue
        weight = dense_weight(layer)
        for adapter in reversed(layer.merged_adapters):
            variant = VARIANTS[layer.lora_settings[adapter].variant]
            weight = variant.unmerged_weight(layer, adapter, weight, layer.merge_state)
        assign_dense_weight(layer, weight)
        layer.merged_adapters.clear()
    return model


def merge_and_unload(model: nn.Module, adapter_names: Optional[list[str]] = None, safe: bool = True) -> nn.Module:
    """Merge adapters, then drop all adapter machinery: every LoRA layer becomes its plain base class again
    (``nn.Linear``, ``nn.Embedding``, ...), in place.

    Args:
        model: A model with LoRA adapters.
        adapter_names: Adapters to merge; default: the active ones. Others are discarded.
        safe: See :func:`merge_lora`.

    Returns:
        The same ``model``, now free of adapters.
    """
    merge_lora(model, adapter_names=adapter_names, safe=safe)
    return strip_adapters(model)

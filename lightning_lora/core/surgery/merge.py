"""Folding adapters into the base weights and back out, and computing without them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from lightning_lora.core.common.base_weights import assign_dense_weight, dense_weight
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.forward_plan import MERGE, check_plans_allow
from lightning_lora.core.surgery.removal import strip_adapters


def _merge_plan(model: nn.Module, adapter_names: Optional[list[str]]) -> list[tuple[str, LoraLayer, list[str]]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA adapters to merge; add them with apply_lora(model, config).")
    check_plans_allow(layers, MERGE, "Merging")
    if adapter_names is not None:
        known = {a for _, layer in layers for a in layer.lora_settings}
        unknown = [a for a in adapter_names if a not in known]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; the model has {sorted(known)}.")
    plan = []
    for name, layer in layers:
        wanted = layer.active_adapters if adapter_names is None else adapter_names
        pending = [a for a in wanted if a in layer.lora_settings and a not in layer.merged_adapters]
        # A kind that rescales (DoRA) or transforms (OFT) acts on everything computed before it, so its merge is
        # only equivalent when it acts alone.
        involved = set(pending) | set(layer.merged_adapters) | set(layer.active_adapters)
        kinds = [layer.lora_settings[a].kind for a in involved]
        not_additive = sorted({kind.display_name for kind in kinds if kind.action != "add"})
        if pending and not_additive and len(involved) > 1:
            raise ValueError(
                f"{name}: an adapter of kind {'/'.join(not_additive)} can only be merged when it is the layer's only "
                f"active or merged adapter (it has {sorted(involved)}): choose one with set_active_adapters(model, "
                "name) and unmerge_lora(model) first."
            )
        if pending:
            for adapter_name in pending:
                layer.lora_settings[adapter_name].kind.check_mergeable(layer, name, adapter_name)
            biased = [a for a in pending if layer.lora_settings[a].kind.bias_delta(layer, a) is not None]
            if biased and getattr(layer, "bias", None) is None:
                raise ValueError(
                    f"{name} has no bias, so the bias on B of {biased} (lora_bias=True) has nowhere to merge (PEFT "
                    "refuses too). Keep the adapter unmerged (save_adapter), or train it without lora_bias."
                )
            plan.append((name, layer, pending))
    return plan


def merged_bias(layer: LoraLayer, adapters: list[str], sign: float = 1.0) -> Optional[torch.Tensor]:
    """The layer's bias with ``sign`` times the adapters' bias updates added (LoRA's ``lora_bias``), or None when
    none of them has a bias of its own.

    Args:
        layer: The adapted layer.
        adapters: The adapters being merged (or unmerged, with ``sign=-1``).
        sign: ``1`` to merge, ``-1`` to unmerge.
    """
    deltas = [d for a in adapters if (d := layer.lora_settings[a].kind.bias_delta(layer, a)) is not None]
    if not deltas:
        return None
    return layer.bias.detach() + sign * sum(deltas).to(layer.bias.dtype)


def _refuse_tied_weights(model: nn.Module, plan: list[tuple[str, LoraLayer, list[str]]]) -> None:
    owners: dict[int, list[str]] = {}  # parameter -> every state-dict key it appears under
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter_name, parameter in module._parameters.items():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(f"{module_name}.{parameter_name}".lstrip("."))
    for name, layer, _ in plan:
        key = layer.weight_key(name)
        sharing = [k.rpartition(".")[0] for k in owners.get(id(layer.weight), []) if k != key]
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
                weight = layer.lora_settings[adapter].kind.merged_weight(layer, adapter, weight, {})
                bias = merged_bias(layer, [adapter])
                if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
                    raise ValueError(
                        f"Merging adapter {adapter!r} into {name or 'the model'} gives NaN/Inf weights; nothing was "
                        "merged. The adapter is broken (diverged training?): check its tensors and learning rate."
                    )
    for _, layer, pending in plan:
        weight = dense_weight(layer)
        for adapter in pending:
            kind = layer.lora_settings[adapter].kind
            weight = kind.merged_weight(layer, adapter, weight, layer.merge_state)
            layer.merged_adapters.append(adapter)
        assign_dense_weight(layer, weight)
        _assign_bias(layer, merged_bias(layer, pending))
    return model


@torch.no_grad()
def _assign_bias(layer: LoraLayer, bias: Optional[torch.Tensor]) -> None:
    if bias is not None:
        layer.bias.copy_(bias)


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
            kind = layer.lora_settings[adapter].kind
            weight = kind.unmerged_weight(layer, adapter, weight, layer.merge_state)
        assign_dense_weight(layer, weight)
        _assign_bias(layer, merged_bias(layer, layer.merged_adapters, sign=-1.0))
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


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes as its base model (merged adapters are taken out and put back).

    Args:
        model: A model with LoRA adapters.

    Example::

        with disable_adapters(model):
            reference = model(x)  # base-model output
    """
    layers = [layer for _, layer in lora_layers(model)]
    merged = {layer: list(layer.merged_adapters) for layer in layers if layer.merged_adapters}
    previous = [layer.adapters_disabled for layer in layers]
    if merged:
        unmerge_lora(model)
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.adapters_disabled = flag
        for layer, names in merged.items():
            merge_lora(layer, adapter_names=names)


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged first): the base model again, in place.

    Base weights that hold the residual of an SVD init get the adapter's initial part back.

    Args:
        model: A model with LoRA adapters.
    """
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        unmerge_lora(model)
    for _, layer in lora_layers(model):
        for adapter_name in reversed(list(layer.lora_settings)):
            layer.lora_settings[adapter_name].kind.release_base(layer, adapter_name)
    return strip_adapters(model)

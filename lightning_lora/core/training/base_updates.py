"""Training that also moves the frozen base weights of adapted layers (ReLoRA's restarts, Delta-LoRA's steps).

Such a run leaves a model that no adapter file against the original base reproduces, so the layers it touched
are marked: adapter-only checkpoints then keep what those layers need (see the Lightning layer's checkpoint
rules) and :func:`check_base_untouched` refuses adapter files until the adapter is exported as a merged model.

Every function works on whole tensors and on FSDP2 shards (``DTensor``) alike: factors are gathered, the dense
update is computed once, whole, and each rank adds its own slice, so every process computes the same numbers as one
process does.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from lightning_lora.core.common.base_weights import is_plain_weight
from lightning_lora.core.common.distributed import copy_into, full_tensor, is_dtensor
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers

_TRAINED_BY = "_lora_base_trained_by"  # layer attribute: {adapter name: the algorithm that moves the base}
_CHECKPOINT_WEIGHT = "_lora_checkpoint_base_weight"  # layer attribute: checkpoints keep the whole weight


@torch.no_grad()
def add_to_base_weight(layer: LoraLayer, delta_out_in: torch.Tensor) -> None:
    """``weight += delta`` in place, ``delta`` whole and ``[out, in, *kernel]``; a sharded weight adds its slice.

    Raises:
        ValueError: A quantised base weight (every addition would be rounded to its 4/8-bit grid).
    """
    if not is_plain_weight(layer):
        raise ValueError(
            f"{type(layer).__name__} has a quantised base weight; adding updates to it would round them away. "
            "Train the base in floating point (no QLoRA) for ReLoRA and Delta-LoRA."
        )
    delta = layer.to_weight_layout(delta_out_in)
    if is_dtensor(layer.weight):
        from torch.distributed.tensor import distribute_tensor

        weight = layer.weight
        delta = distribute_tensor(delta.to(weight.device), weight.device_mesh, weight.placements)
    layer.weight.add_(delta)


def whole_factors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached whole ``(A, B)`` of a LoRA adapter (gathered under FSDP2: every rank must call)."""
    return full_tensor(layer.lora_A[adapter_name].detach()), full_tensor(layer.lora_B[adapter_name].detach())


@torch.no_grad()
def reinitialize_lora(layer: LoraLayer, adapter_name: str, generator: torch.Generator) -> None:
    """Start a LoRA adapter afresh as LoRA's default init does: ``A`` Kaiming-uniform, ``B`` zero.

    ``A`` is drawn whole on the CPU from ``generator``, so every rank (and a resumed run) draws the same values.
    """
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    fresh = torch.empty(tuple(lora_A.shape), dtype=torch.float32)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    copy_into(lora_A, fresh.to(lora_A.dtype))
    lora_B.zero_()


@torch.no_grad()
def prune_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], ratio: float) -> None:
    """Zero the smallest ``ratio`` of every per-element state tensor (Adam's moments, momentum) of ``parameters``.

    ``ratio=1`` resets that state completely; counters (Adam's ``step``) are kept.

    Args:
        optimizer: The optimizer holding the state.
        parameters: The parameters whose state is pruned.
        ratio: Fraction of entries (by magnitude, per tensor) set to zero, in ``[0, 1]``.
    """
    for parameter in parameters:
        for value in optimizer.state.get(parameter, {}).values():
            if not (torch.is_tensor(value) and value.is_floating_point() and value.shape == parameter.shape):
                continue
            if ratio >= 1.0:
                value.zero_()
                continue
            whole = full_tensor(value)
            magnitude = whole.abs().flatten().float()
            pruned = int(ratio * magnitude.numel())
            if pruned == 0:
                continue
            threshold = magnitude.kthvalue(pruned).values
            copy_into(value, whole * (magnitude > threshold).view_as(whole).to(whole.dtype))


# ----- which layers had their base moved -----
def mark_base_trained(layer: LoraLayer, adapter_name: str, algorithm: str, checkpoint_weight: bool) -> None:
    """Record that ``algorithm`` moves the base weight of ``layer`` while training ``adapter_name``.

    Args:
        layer: The adapted layer.
        adapter_name: The adapter being trained.
        algorithm: Its name, for messages.
        checkpoint_weight: Adapter-only checkpoints keep this layer's whole weight (when the change is not low-rank,
            Delta-LoRA); False when the algorithm keeps its own compact record (ReLoRA's folded factors).
    """
    layer.__dict__.setdefault(_TRAINED_BY, {})[adapter_name] = algorithm
    if checkpoint_weight:
        layer.__dict__[_CHECKPOINT_WEIGHT] = True


def base_trained_by(layer: nn.Module) -> dict[str, str]:
    """``{adapter name: algorithm}`` that moved this layer's base weight (empty when none did)."""
    return layer.__dict__.get(_TRAINED_BY, {})


def trained_base_weight_names(model: nn.Module) -> list[str]:
    """Names (``<layer>.weight``) of the moved base weights that adapter-only checkpoints keep whole."""
    return [
        f"{name}.weight" if name else "weight"
        for name, layer in lora_layers(model)
        if _CHECKPOINT_WEIGHT in layer.__dict__
    ]


def check_base_untouched(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Raise when training moved base weights of ``adapter_name``'s layers (any adapter's, for None).

    Raises:
        ValueError: Names the algorithm and the fix (export the merged model).
    """
    for name, layer in lora_layers(model):
        algorithms = {a: alg for a, alg in base_trained_by(layer).items() if adapter_name in (None, a)}
        if algorithms:
            algorithm = next(iter(algorithms.values()))
            raise ValueError(
                f"{algorithm} changed the base weights of the adapted layers ({name or 'the model'}, ...): the "
                "adapter alone, applied to the original base, does not reproduce the trained model, and what was "
                "folded into the base exceeds the adapter's rank, so no LoRA file can hold it. Export the merged "
                "model instead: LoraCallback(merge_on_fit_end=True, merged_weights_dir=...) or "
                "save_merged_model(model, directory)."
            )

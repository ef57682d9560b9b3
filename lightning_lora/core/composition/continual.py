"""Continual learning with one LoRA adapter per task: O-LoRA's orthogonal-subspace penalty (Wang et al. 2023,
https://arxiv.org/abs/2310.14152).

Each new task trains its own adapter while the earlier tasks' adapters stay frozen and active. O-LoRA keeps the new
adapter's input subspace (the rows of its ``A``) orthogonal to every earlier one's with
``sum |A_earlier A_new^T|`` over the adapted layers (the authors' code takes the absolute values' sum), plus an
optional L2 term ``sum ||p||_2`` over the new adapter's tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lightning_lora.core.layers.adapted_layer import LoraLayer


def _whole(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor, differentiably (an FSDP2 shard is gathered)."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def orthogonal_subspace_penalty(
    layers: Sequence[tuple[str, LoraLayer]], adapter_name: str, earlier_adapters: Sequence[str]
) -> torch.Tensor:
    """O-LoRA's penalty: ``sum over layers and earlier adapters of |A_earlier @ A_new^T|`` (entries summed).

    Args:
        layers: The adapted layers.
        adapter_name: The adapter of the task being trained.
        earlier_adapters: The frozen adapters of earlier tasks.
    """
    total = None
    for _, layer in layers:
        if adapter_name not in layer.lora_settings:
            continue
        new = _whole(layer.lora_A[adapter_name]).flatten(1)
        for earlier in earlier_adapters:
            if earlier in layer.lora_settings:
                overlap = (_whole(layer.lora_A[earlier]).flatten(1).to(new.dtype) @ new.T).abs().sum()
                total = overlap if total is None else total + overlap
    if total is None:
        raise ValueError(f"No layer holds adapter {adapter_name!r} beside one of {list(earlier_adapters)}.")
    return total


def adapter_l2_norm(layers: Sequence[tuple[str, LoraLayer]], adapter_name: str) -> torch.Tensor:
    """``sum ||p||_2`` over the adapter's ``A`` and ``B`` tensors (O-LoRA's L2 term)."""
    norms = [
        torch.linalg.vector_norm(_whole(getattr(layer, factor)[adapter_name]))
        for _, layer in layers
        if adapter_name in layer.lora_settings
        for factor in ("lora_A", "lora_B")
    ]
    return torch.stack(norms).sum()

"""Adapters stay float32 under Lightning's true half precisions.

``precision="bf16-true"`` or ``"16-true"`` casts the whole module (``module.to(dtype)``) after ``configure_model``.
The package's rule, as PEFT's ``autocast_adapter_dtype``, is float32 adapters on a low-precision base: the adapted
layers cast at their boundary, the optimizer's state follows the adapter tensors' dtype, and the updates keep the
precision a small adapter needs. So the cast is wrapped: the adapter tensors keep the values they held before it (a
checkpoint restored into them before the cast stays bit for bit), in float32, while everything else is cast.
``modules_to_save`` copies are cast with the base: they are plain layers, which compute in the input's dtype.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lora.core.layers.adapter_tensors import adapter_tensors

_PATCHED = "_lora_keeps_adapters_float32"


def keep_adapters_float32(precision_plugin: Any) -> None:
    """Make a true-half-precision plugin cast everything but the adapter tensors, which stay (or become) float32.
    Other plugins are left as they are; a true half precision under FSDP1 or DeepSpeed, whose flat parameters hold
    one dtype, is said once: there the adapters train in the half dtype. Idempotent.

    Args:
        precision_plugin: The Trainer's ``strategy.precision_plugin``.
    """
    flag = str(getattr(precision_plugin, "precision", ""))
    if flag not in ("bf16-true", "16-true") or precision_plugin.__dict__.get(_PATCHED):
        return
    if not isinstance(precision_plugin, HalfPrecision):
        rank_zero_warn(
            f"precision={flag!r} under {type(precision_plugin).__name__}: the strategy keeps one dtype per flat "
            "parameter, so the LoRA adapters train in the half dtype with the base. For float32 adapters use "
            f"precision='{flag.replace('-true', '-mixed')}', or a single device, DDP or FSDP2 strategy."
        )
        return
    original = precision_plugin.convert_module

    def convert_module(self: Any, module: nn.Module) -> nn.Module:
        kept = [(tensor, tensor.data) for _, tensor in adapter_tensors(module) if tensor.is_floating_point()]
        converted = original(module)
        for tensor, data in kept:
            tensor.data = data.to(torch.float32)
        return converted

    precision_plugin.convert_module = MethodType(convert_module, precision_plugin)
    precision_plugin.__dict__[_PATCHED] = True

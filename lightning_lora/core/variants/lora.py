"""Plain LoRA: ``result + scaling * B(A(dropout(x)))``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_lora.core.variants.base import AdapterVariant

if TYPE_CHECKING:
    from lightning_lora.core.layers import LoraLayer


class LoraVariant(AdapterVariant):
    """The low-rank update of Hu et al. (2021), https://arxiv.org/abs/2106.09685."""

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        settings = layer.lora_settings[adapter_name]
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        h = layer.adapter_input(x, settings.dropout, lora_A.dtype)
        update = layer.lora_output(h, lora_A, lora_B, settings.scaling)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def merged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return weight + layer.delta_weight(adapter_name)

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return weight - layer.delta_weight(adapter_name)

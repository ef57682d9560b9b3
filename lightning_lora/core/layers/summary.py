"""How many parameters train, in total and per adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.layers.adapter_tensors import adapter_parameters


def parameter_count(parameter: torch.Tensor) -> int:
    """Number of values a parameter stands for (a packed 4-bit weight counts its unpacked size, a DeepSpeed ZeRO-3
    partition its whole tensor)."""
    whole = getattr(parameter, "ds_numel", None)  # ZeRO-3 leaves an empty tensor on the module between gathers
    if whole is not None:
        return int(whole)
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return parameter.numel()


@dataclass
class TrainableSummary:
    """Parameter counts of a model with adapters.

    Attributes:
        trainable: Parameters with ``requires_grad``.
        total: All parameters (tied ones counted once).
        per_adapter: Adapter tensor counts per adapter name.
    """

    trainable: int
    total: int
    per_adapter: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        adapters = ", ".join(f"{name}={count:,}" for name, count in self.per_adapter.items())
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}" + (f" || adapters: {adapters}" if adapters else "")
        )


def trainable_parameters_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters, and each adapter's size.

    Args:
        model: Any module.
    """
    parameters = list(model.parameters())
    return TrainableSummary(
        trainable=sum(parameter_count(p) for p in parameters if p.requires_grad),
        total=sum(parameter_count(p) for p in parameters),
        per_adapter={
            name: sum(parameter_count(p) for _, p in adapter_parameters(model, name)) for name in adapter_names(model)
        },
    )

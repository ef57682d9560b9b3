"""The interface every adapter variant implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_lora.core.layers import LoraLayer


class AdapterVariant:
    """How one adapter of a :class:`~lightning_lora.core.layers.LoraLayer` computes and merges.

    Attributes:
        parameter_dicts: Names of extra ``nn.ParameterDict`` attributes the variant keeps on the layer (keyed by
            adapter name), saved with the adapter.
    """

    parameter_dicts: tuple[str, ...] = ()

    def add_parameters(self, layer: LoraLayer, adapter_name: str, **tensor_options: Any) -> None:
        """Create the variant's own tensors for a new adapter (values come later, from :meth:`init`)."""

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Set the variant's own tensors once ``lora_A``/``lora_B`` hold their initial values."""

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Return ``result`` (the output so far) with this adapter's contribution for input ``x``."""
        raise NotImplementedError

    def merged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The dense base ``weight`` (the layer's own layout) with this adapter folded in; ``weight`` is not changed.

        Args:
            layer: The LoRA layer.
            adapter_name: The adapter to fold in.
            weight: The current dense weight.
            record: Where to keep what :meth:`unmerged_weight` will need, under ``adapter_name`` (a merge into the
                live layer passes ``layer.merge_state``; a merged copy passes a throwaway dict).
        """
        raise NotImplementedError

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`, given the ``record`` it filled."""
        raise NotImplementedError

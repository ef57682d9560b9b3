"""DoRA: weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is ``m * (W + s B A) / ||W + s B A||``, one norm and one trainable magnitude ``m`` per output
unit. As in section 4.3 of the paper (and PEFT), the norm is treated as a constant: it gets no gradient. With the
base output ``Wx = result - bias`` the layer output becomes ``(m / n) * (Wx + s B A x) + bias``.

On a grouped convolution the LoRA update is not a grouped kernel (``A`` reads every input channel), so no single
kernel holds ``W + s B A``. There PEFT takes the norm of ``W + s * reshape(B' A')`` with ``B'`` the grouped ``B``
viewed as ``[out / groups, r]`` and the product reshaped to ``W``'s shape, and refuses to merge; the same norm is
kept here, so PEFT's files give PEFT's outputs, and merging is refused by name as in PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from lightning_lora.core.inits.svd_init import INIT_FACTOR_DICTS
from lightning_lora.core.kinds.base import AdapterTensor
from lightning_lora.core.kinds.lora import LoraKind

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer


class DoraKind(LoraKind):
    """LoRA factors plus magnitudes in ``layer.lora_magnitude[adapter]``, shape ``[out]``; rescales the output."""

    name = "dora"
    display_name = "DoRA"
    action = "rescale"
    lora_factors = False  # the magnitudes rescale the whole output: slicing or projecting the factors alone is wrong

    def plain_factors(self, settings: AdapterSettings) -> bool:
        return False
    vllm_servable = False
    adapts_grouped_convolutions = True
    containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude", *INIT_FACTOR_DICTS)

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        out_features = layer.lora_dims()[1]
        return [*super().tensors(layer, settings), AdapterTensor("lora_magnitude", (out_features,), "magnitude")]

    @torch.no_grad()
    def weight_norm(self, layer: LoraLayer, adapter_name: str, weight_out_in: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` per output unit for a dense ``[out, in, *kernel]`` weight, in float32 or wider."""
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        dtype = torch.promote_types(weight_out_in.dtype, torch.float32)
        weight, r = weight_out_in.flatten(1).to(dtype), lora_A.shape[0]
        if getattr(layer, "groups", 1) == 1:
            combined = torch.addmm(weight, lora_B.flatten(1).to(dtype), lora_A.flatten(1).to(dtype),
                                   alpha=layer.scaling(adapter_name))
        else:  # PEFT's grouped layout (see the module docstring)
            product = lora_B.reshape(-1, r).to(dtype) @ lora_A.reshape(r, -1).to(dtype)
            combined = weight + layer.scaling(adapter_name) * product.reshape(weight.shape)
        return torch.linalg.vector_norm(combined, dim=1)

    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        super().initialize(layer, adapter_name)
        self.after_base_change(layer, adapter_name)

    @torch.no_grad()
    def after_base_change(self, layer: LoraLayer, adapter_name: str) -> None:
        layer.lora_magnitude[adapter_name].copy_(self.weight_norm(layer, adapter_name, layer.base_weight_out_in()))

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        settings = layer.lora_settings[adapter_name]
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        magnitude = layer.lora_magnitude[adapter_name]
        norm = self.weight_norm(layer, adapter_name, layer.base_weight_out_in())
        scale = layer.channel_view(magnitude / norm.to(magnitude.dtype)).to(result.dtype)
        h = layer.adapter_input(x, settings.dropout, lora_A.dtype)
        update = layer.lora_output(h, lora_A, lora_B, settings.scaling).to(result.dtype)
        bias = layer.channel_view(layer.bias) if getattr(layer, "bias", None) is not None else None
        if not (layer.training and settings.dropout > 0.0):
            # The base output for this input is already in ``result``: rescale it instead of a second matmul.
            combined = (result if bias is None else result - bias) + update
            return combined * scale if bias is None else combined * scale + bias
        # With dropout the adapter sees another input than the base did, so W(dropout(x)) is computed (as PEFT).
        base_on_h = layer.base_class.forward(layer, h.to(result.dtype))
        if bias is not None:
            base_on_h = base_on_h - bias
        return result + (scale - 1) * base_on_h + scale * update

    def merged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``m / ||W + s B A|| * (W + s B A)``; the norm goes into ``record`` for the unmerge."""
        weight_out_in = layer.weight_out_in(weight)
        norm = self.weight_norm(layer, adapter_name, weight_out_in)
        record[adapter_name] = norm  # the unmerge needs the norm of the weight before the merge
        scale = self._per_row(layer, adapter_name, norm, weight_out_in)
        merged = scale * (weight_out_in + layer.weight_out_in(layer.delta_weight(adapter_name)))
        return layer.weight_out_in(merged.to(weight.dtype))

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`, with the norm it recorded."""
        weight_out_in = layer.weight_out_in(weight)
        norm = record.pop(adapter_name)
        scale = self._per_row(layer, adapter_name, norm, weight_out_in)
        unmerged = weight_out_in / scale - layer.weight_out_in(layer.delta_weight(adapter_name))
        return layer.weight_out_in(unmerged.to(weight.dtype))

    @staticmethod
    def _per_row(layer: LoraLayer, adapter_name: str, norm: torch.Tensor, weight_out_in: torch.Tensor) -> torch.Tensor:
        magnitude = layer.lora_magnitude[adapter_name].detach()
        dtype = torch.promote_types(magnitude.dtype, torch.float32)  # float32 or wider (float64 models stay exact)
        scale = magnitude.to(dtype) / norm.to(magnitude.device, dtype)  # the model may have moved
        return scale.view(-1, *([1] * (weight_out_in.dim() - 1))).to(weight_out_in.dtype)

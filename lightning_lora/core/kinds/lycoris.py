"""What the LyCORIS kinds (LoHa, LoKr) share, as PEFT's ``LycorisLayer``: a dense update built from the kind's
factors, applied with the base layer's own operation, with rank dropout and module dropout in training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

from lightning_lora.core.config import AdapterConfig
from lightning_lora.core.kinds.base import AdapterKind
from lightning_lora.core.layers import ConvAdapters, LinearAdapters, TransposedLinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers import AdapterSettings, LoraLayer

LYCORIS_LAYERS = "nn.Linear, nn.Conv1d and nn.Conv2d"


class LycorisKind(AdapterKind):
    """A kind whose update is a dense weight computed from its factors: ``base(x) + base_op(x, scaling * dW)``.

    Subclasses give :meth:`dense_delta` (the unscaled update, ``[out, in * k]`` or ``[out, in, *kernel]``).
    """

    #: LoHa rescales the kept rows after rank dropout; LoKr only with ``rank_dropout_scale``.
    rescales_rank_dropout: ClassVar[bool] = False

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)
        supported = layer_type is LinearAdapters or (
            layer_type is ConvAdapters and isinstance(module, (nn.Conv1d, nn.Conv2d))
        )
        if not supported or layer_type is TransposedLinearAdapters:
            raise ValueError(
                f"A {self.display_name} adapter cannot go on {layer_name} ({type(module).__name__}): {self.display_name} "
                f"adapts "
                f"{LYCORIS_LAYERS} (as PEFT). Leave it out with exclude_modules, or use LoraConfig for it."
            )

    @staticmethod
    def uses_cp(layer: LoraLayer, config: AdapterConfig) -> bool:
        """Whether the kernel gets a CP decomposition (``use_effective_conv2d`` on a kernel larger than 1)."""
        kernel = layer.lora_dims()[2]
        return bool(kernel) and config.use_effective_conv2d and any(k != 1 for k in kernel)

    def dense_delta(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """The unscaled update of one adapter, any shape with ``out * in * prod(kernel)`` elements in row-major
        ``[out, in, *kernel]`` order."""
        raise NotImplementedError

    def delta_out_in(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``scaling * dW`` as ``[out, in, *kernel]``."""
        in_features, out_features, kernel = layer.lora_dims()
        delta = self.dense_delta(layer, adapter_name) * layer.scaling(adapter_name)
        return delta.reshape(out_features, in_features, *kernel)

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        return layer.to_weight_layout(self.delta_out_in(layer, adapter_name))

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        config = layer.lora_settings[adapter_name].config
        if layer.training and config.module_dropout > 0 and not torch.rand(1) > config.module_dropout:
            return result
        delta = self.delta_out_in(layer, adapter_name)
        if layer.training and config.rank_dropout > 0:
            keep = (torch.rand(delta.shape[0]) > config.rank_dropout).to(delta.dtype)
            if self.rescales_rank_dropout or getattr(config, "rank_dropout_scale", False):
                keep = keep / keep.mean()
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1))).to(delta.device)
        update = layer.dense_output(x if x.dtype == delta.dtype else x.to(delta.dtype), delta)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def peft_config_fields(self, config: AdapterConfig) -> dict[str, Any]:
        raise NotImplementedError

    def config_from_peft(self, values: Mapping[str, Any], targeting: dict[str, Any]) -> AdapterConfig:
        fields = {name: values[name] for name in self.peft_fields if name in values and values[name] is not None}
        return self.config_class(**targeting, **fields)

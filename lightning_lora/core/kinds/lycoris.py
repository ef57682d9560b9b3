"""What the LyCORIS kinds (LoHa, LoKr) share, as PEFT's ``LycorisLayer``: a dense update built from the kind's
factors, applied with the base layer's own operation, with rank dropout and module dropout in training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_lora.core.config.adapter_config import LOW_RANK_ARGS, TARGETING_ARGS, AdapterConfig, LowRankConfig
from lightning_lora.core.config.fields import check_dropout
from lightning_lora.core.kinds.base import AdapterKind
from lightning_lora.core.layers.layer_types import ConvAdapters, LinearAdapters, TransposedLinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

LYCORIS_LAYERS = "nn.Linear, nn.Conv1d and nn.Conv2d"
LYCORIS_ARGS = """
        rank_dropout: In training, drop whole output rows of the update with this probability.
        module_dropout: In training, skip the whole adapter for a step with this probability.
        use_effective_conv2d: On convolutions with kernels larger than 1, factor the kernel with a CP core instead
            of flattening it into the input dimension."""


@dataclass(kw_only=True)
class LycorisConfig(LowRankConfig):
    __doc__ = """The fields LoHa and LoKr share (PEFT's ``LycorisConfig``).

    Args:""" + LOW_RANK_ARGS + TARGETING_ARGS + LYCORIS_ARGS + """
    """

    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout("rank_dropout", self.rank_dropout)
        check_dropout("module_dropout", self.module_dropout)


class LycorisKind(AdapterKind):
    """A kind whose update is a dense weight computed from its factors: ``base(x) + base_op(x, scaling * dW)``.

    ``dW`` has the base kernel's shape (:meth:`~lightning_lora.core.layers.adapted_layer.LoraLayer.weight_dims`), a
    grouped convolution's included, so it always merges.

    Subclasses give :meth:`dense_delta` (the unscaled update, ``[out, in * k]`` or ``[out, in, *kernel]``).
    """

    #: LoHa rescales the kept rows after rank dropout; LoKr only with ``rank_dropout_scale``.
    rescales_rank_dropout: ClassVar[bool] = False
    adapts_grouped_convolutions = True

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)
        supported = layer_type is LinearAdapters or (
            layer_type is ConvAdapters and isinstance(module, (nn.Conv1d, nn.Conv2d))
        )
        if not supported or layer_type is TransposedLinearAdapters:
            raise ValueError(
                f"A {self.display_name} adapter cannot go on {layer_name} ({type(module).__name__}): "
                f"{self.display_name} adapts "
                f"{LYCORIS_LAYERS} (as PEFT). Leave it out with exclude_modules, or use LoraConfig for it."
            )

    @staticmethod
    def uses_cp(layer: LoraLayer, config: AdapterConfig) -> bool:
        """Whether the kernel gets a CP decomposition (``use_effective_conv2d`` on a kernel larger than 1)."""
        kernel = layer.weight_dims()[2]
        return bool(kernel) and config.use_effective_conv2d and any(k != 1 for k in kernel)

    def dense_delta(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unscaled update from one adapter's tensors (``{container: tensor}``), any shape with
        ``out * in * prod(kernel)`` elements in row-major ``[out, in, *kernel]`` order."""
        raise NotImplementedError

    def delta_out_in(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``scaling * dW`` as ``[out, in, *kernel]``.

        Under autograd the products between the factors are recomputed in the backward pass instead of being
        kept (as PEFT's custom autograd functions do): only the factors and the dense update stay in memory.
        """
        names = layer.adapter_containers(adapter_name)
        factors = [getattr(layer, name)[adapter_name] for name in names]
        scaling = layer.scaling(adapter_name)

        def update(*values: torch.Tensor) -> torch.Tensor:
            return self.dense_delta(dict(zip(names, values))) * scaling

        if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
            delta = checkpoint(update, *factors, use_reentrant=False)
        else:
            delta = update(*factors)
        in_features, out_features, kernel = layer.weight_dims()
        return delta.reshape(out_features, in_features, *kernel)

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        return layer.to_weight_layout(self.delta_out_in(layer, adapter_name))

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        config = layer.lora_settings[adapter_name].config
        if layer.training and config.module_dropout > 0 and not torch.rand(1) > config.module_dropout:
            return result
        update = self.update(layer, adapter_name, x)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def update(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x``: the base operation with the dense update
        (rank dropout applied in training)."""
        config = layer.lora_settings[adapter_name].config
        delta = self.delta_out_in(layer, adapter_name)
        if layer.training and config.rank_dropout > 0:
            keep = (torch.rand(delta.shape[0]) > config.rank_dropout).to(delta.dtype)
            if self.rescales_rank_dropout or getattr(config, "rank_dropout_scale", False):
                keep = keep / keep.mean()
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1))).to(delta.device)
        return layer.dense_output(x if x.dtype == delta.dtype else x.to(delta.dtype), delta)


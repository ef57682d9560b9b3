"""The layer types adapters live on, one mixin each: ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding`` and
``nn.Conv1d/2d/3d``. Each gives the geometry every adapter kind works through (dims, weight layout, how low-rank
factors or a dense weight apply to an input); :func:`layer_type_of` picks the mixin for a module.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.parameter_adapters import ParameterAdapters


class LinearAdapters(LoraLayer):
    """Adapters on ``nn.Linear`` (and subclasses such as bitsandbytes ``Linear4bit``): weight ``[out, in]``."""

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_features, self.out_features, ()

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        return F.linear(F.linear(h, lora_A) * scaling, lora_B)

    def dense_output(self, h: torch.Tensor, weight_out_in: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight_out_in)

    def add_lora_output(
        self, result: torch.Tensor, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        # One addmm adds the scaled up-projection to the base output: two autograd nodes where a product, a scale
        # and a sum took four (benchmarks/per_call.py measures the per-layer cost).
        if result.dtype != h.dtype or type(result) is not torch.Tensor or result.shape[:-1] != h.shape[:-1]:
            return super().add_lora_output(result, h, lora_A, lora_B, scaling)
        down = F.linear(h, lora_A)
        if result.dim() == 2:
            return torch.addmm(result, down, lora_B.t(), alpha=scaling)
        rows = down.reshape(-1, down.shape[-1])
        return torch.addmm(result.reshape(-1, result.shape[-1]), rows, lora_B.t(), alpha=scaling).view(result.shape)


class TransposedLinearAdapters(LinearAdapters):
    """Adapters on Hugging Face ``Conv1D`` (GPT-2 style), whose weight is stored ``[in, out]``."""

    weight_is_transposed = True

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        in_features, out_features = self.weight.shape
        return in_features, out_features, ()


class EmbeddingAdapters(LoraLayer):
    """Adapters on ``nn.Embedding``: ``A: [r, num_embeddings]`` is looked up like the table, ``B: [dim, r]``.

    Dropout does not apply to token indices; a Hugging Face ``embed_scale`` (Gemma) scales the adapter output too.
    """

    weight_is_transposed = True
    applies_dropout = False

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.num_embeddings, self.embedding_dim, ()

    def adapter_input(self, x: torch.Tensor, dropout: float, dtype: torch.dtype) -> torch.Tensor:
        return x

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        looked_up = F.embedding(
            h, lora_A.t(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return self._embed_scaled((looked_up * scaling) @ lora_B.t())

    def _embed_scaled(self, output: torch.Tensor) -> torch.Tensor:
        embed_scale = getattr(self, "embed_scale", None)
        return output if embed_scale is None else output * embed_scale.to(output.dtype)


class ConvAdapters(LoraLayer):
    """Adapters on ``nn.Conv1d/2d/3d``: ``A`` is a convolution with the base kernel, stride, padding and dilation;
    ``B`` a 1x1 convolution, so ``B @ A`` is a kernel of the base's shape and merging is exact.

    On a grouped convolution (``groups > 1``) ``A`` sees every input channel and ``B`` is grouped like the base
    (``[out, r / groups, 1, ...]``), as in PEFT. That update links every input channel to every output channel, which
    no grouped kernel holds, so LoRA factors there never merge; kinds with a dense update (LoHa, LoKr) build it in the
    grouped kernel's shape (:meth:`weight_dims`) and merge.
    """

    _CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_channels, self.out_channels, tuple(self.kernel_size)

    def weight_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_channels // self.groups, self.out_channels, tuple(self.kernel_size)

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape_A, (out_channels, _, *ones) = super().adapter_shapes(r)
        return shape_A, (out_channels, r // self.groups, *ones)

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        hidden = self._ungrouped_conv(h, lora_A) if self.groups > 1 else self._conv_forward(h, lora_A, None)
        return self._CONV_FN[lora_B.dim()](hidden * scaling, lora_B, groups=self.groups)

    def _ungrouped_conv(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base's geometry (stride, padding and its mode, dilation) with ``groups=1``."""
        padding = self.padding
        if self.padding_mode != "zeros":
            h, padding = F.pad(h, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return self._CONV_FN[weight.dim()](h, weight, None, self.stride, padding, self.dilation)

    def dense_output(self, h: torch.Tensor, weight_out_in: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(h, weight_out_in, None)

    def channel_view(self, per_channel: torch.Tensor) -> torch.Tensor:
        return per_channel.view(1, -1, *([1] * len(self.kernel_size)))


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers is not a dependency: recognise its Conv1D by name and shape attributes.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def layer_type_of(module: nn.Module) -> Optional[type[LoraLayer]]:
    """The layer-type mixin that can adapt ``module``, or None when the type is not supported."""
    if isinstance(module, LoraLayer):
        return module.layer_type
    if isinstance(module, nn.Linear):
        return LinearAdapters
    if _is_hf_conv1d(module):
        return TransposedLinearAdapters
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapters
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvAdapters
    return None


SUPPORTED_LAYERS = "nn.Linear, Hugging Face Conv1D, nn.Embedding, nn.Conv1d/2d/3d (grouped: LoRA, DoRA, LoHa, LoKr)"


def check_weighs_per_position(method: str, layer_name: str, layer: LoraLayer, adapters: list[str]) -> None:
    """Raise a ValueError naming the fix unless ``layer`` can weigh its ``adapters`` per position of its output's
    leading dimensions (X-LoRA's gate, AM-LoRA's selector): not a parameter's site, not a convolution, not merged.

    Args:
        method: How the message names the method (``"X-LoRA"``).
        layer_name: The layer's name.
        layer: The adapted layer.
        adapters: The adapters it would weigh.
    """
    if isinstance(layer, ParameterAdapters):
        raise ValueError(
            f"{method}: {layer_name} adapts a parameter (target_parameters), whose update changes the weight for "
            f"every position at once; {method} weighs adapters per position. Leave parameters out."
        )
    if isinstance(layer, ConvAdapters):
        raise ValueError(
            f"{method}: {layer_name} is a convolution (channels first), but {method} weighs adapters per position "
            "of its leading (batch, sequence) dimensions; leave convolutions out."
        )
    if any(name in layer.merged_adapters for name in adapters):
        raise ValueError(f"{method}: adapters are merged into {layer_name}; call unmerge_lora(model) first.")

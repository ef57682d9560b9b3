"""LoRA layers: named low-rank adapters added in place to an existing base layer.

``x -> base(x) + scaling * B(A(dropout(x)))`` with ``A: [r, in]``, ``B: [out, r]`` and ``scaling = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA).

A LoRA layer is the user's own module with its class swapped for a subclass that puts :class:`LoraLayer` in front
of the original class (``nn.Linear`` becomes ``LoraLinear(LinearAdapters, nn.Linear)``), the same idiom FSDP2's
``fully_shard`` uses. So the module keeps its parameters, its state-dict keys (``q_proj.weight``), its own forward
(reached through ``super().forward``), ``isinstance`` checks and quantised storage; the adapters live beside the
weight as ``q_proj.lora_A.<adapter>`` and ``q_proj.lora_B.<adapter>``. Removing the adapters swaps the class back.

One mixin per layer kind below (linear, Hugging Face ``Conv1D``, embedding, convolution) says how that kind applies
``A`` and ``B``; everything else is shared. Variants (plain LoRA, DoRA) live in ``lightning_lora.core.variants``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.base_weights import dense_weight
from lightning_lora.core.config import LoraConfig
from lightning_lora.core.variants import VARIANTS


# Frozen initial factors ``A0`` ([r, in]) and ``B0`` ([out, r]) of adapters whose init moved ``scaling * B0 @ A0``
# out of the base weight (PiSSA, OLoRA, ...); saved with the adapter, see lightning_lora.core.svd_init.
INIT_FACTOR_DICTS = ("lora_init_A", "lora_init_B")
# Every ParameterDict a LoRA layer may hold, keyed by adapter name: the one list to consult for "is this an adapter
# tensor" (state-dict keys end in ``.<container>.<adapter>``).
ADAPTER_CONTAINERS: tuple[str, ...] = (
    "lora_A",
    "lora_B",
    *sorted({name for variant in VARIANTS.values() for name in variant.parameter_dicts}),
    *INIT_FACTOR_DICTS,
)


@dataclass
class AdapterSettings:
    """What one adapter is on one layer: its resolved rank and scale, and the config it came from."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    variant: str
    init: str
    config: LoraConfig
    initialized: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class AdapterDict(nn.ParameterDict):
    """``{adapter name: tensor}`` for one kind of adapter tensor of a LoRA layer.

    The owning layer initialises these tensors (``LoraLayer.reset_parameters``); the no-op ``reset_parameters``
    here tells meta-device materialisers (Lightning's FSDP2 setup, torchtitan) that nothing is left uninitialised.
    """

    def reset_parameters(self) -> None:
        pass


class LoraLayer(nn.Module):
    """Adapter bookkeeping and forward shared by every LoRA layer kind. Never instantiated directly.

    Attributes:
        lora_A: ``{adapter: A}``, ``A`` of shape ``[r, in, *kernel]``.
        lora_B: ``{adapter: B}``, ``B`` of shape ``[out, r, *ones]``.
        lora_settings: ``{adapter: AdapterSettings}``.
        active_adapters: Adapters that take part in forward, in order.
        merged_adapters: Adapters currently folded into the base weight.
        adapters_disabled: When True, forward is the base layer's alone.
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    # Set by the layer-kind mixins.
    weight_is_transposed: bool = False  # weight stored as [in, out] (HF Conv1D, nn.Embedding)
    applies_dropout: bool = True  # False where the input is not a feature vector (token indices)
    base_class: type[nn.Module]
    kind_mixin: type[LoraLayer]

    def _init_lora_state(self) -> None:
        self.lora_A = AdapterDict()
        self.lora_B = AdapterDict()
        self.lora_settings: dict[str, AdapterSettings] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.merge_state: dict[str, torch.Tensor] = {}  # what a variant needs to undo its merge (DoRA: norms)

    # ----- what each layer kind provides -----
    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        """``(in_features, out_features, kernel_size)`` as seen by the adapter."""
        raise NotImplementedError

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``scaling * B(A(h))``, shaped like the base output. Kinds scale the rank-``r`` intermediate, which is
        ``out / r`` times smaller than the output."""
        raise NotImplementedError

    def channel_view(self, per_channel: torch.Tensor) -> torch.Tensor:
        """Reshape a ``[out]`` vector to broadcast over the base output's feature dimension."""
        return per_channel

    def adapter_input(self, x: torch.Tensor, dropout: float, dtype: torch.dtype) -> torch.Tensor:
        """The adapter's input: ``x`` after dropout, in the adapter's dtype."""
        if dropout > 0.0 and self.training:
            x = F.dropout(x, p=dropout, training=True)
        return x if x.dtype == dtype else x.to(dtype)

    # ----- shared behaviour -----
    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features, out_features, kernel = self.lora_dims()
        return (r, in_features, *kernel), (out_features, r, *(1 for _ in kernel))

    def scaling(self, adapter_name: str) -> float:
        return self.lora_settings[adapter_name].scaling

    def weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """View a tensor in the base weight's layout as ``[out, in, *kernel]``."""
        return weight.t() if self.weight_is_transposed else weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's own layout and dtype."""
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        weight = self.weight
        compute_dtype = torch.float32 if lora_A.dtype in (torch.float16, torch.bfloat16) else lora_A.dtype
        delta = lora_B.flatten(1).to(compute_dtype) @ lora_A.flatten(1).to(compute_dtype)
        in_features, out_features, kernel = self.lora_dims()
        delta = (delta * self.scaling(adapter_name)).reshape(out_features, in_features, *kernel)
        if self.weight_is_transposed:
            delta = delta.t()
        return delta.to(weight.dtype if weight.is_floating_point() else compute_dtype)

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as a dense ``[out, in, *kernel]`` tensor (dequantised if needed)."""
        return self.weight_out_in(dense_weight(self))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        if self.adapters_disabled:
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                settings = self.lora_settings[name]
                if not settings.initialized:
                    self._raise_uninitialized(name)
                result = VARIANTS[settings.variant].forward(self, name, x, result)
        return result

    def _raise_uninitialized(self, adapter_name: str) -> None:
        if self.weight.is_meta:
            return
        raise RuntimeError(
            f"Adapter {adapter_name!r} (init={self.lora_settings[adapter_name].init!r}) is not initialised yet: it "
            "was added on the meta device, re-created by reset_parameters(), or added with initialize=False. Load "
            "the real base weights, then call lightning_lora.initialize_pending_adapters(model) (or load the "
            "adapter's saved state)."
        )

    def reset_parameters(self) -> None:
        """Re-initialise the base layer as its class does, then the adapters (used to materialise a meta model).

        Adapters whose init reads the base weight (PiSSA, OLoRA, ...) are left pending: the weight is still a
        placeholder here. :func:`~lightning_lora.core.inject.initialize_pending_adapters` runs them once the real
        weights are loaded.
        """
        base_reset = getattr(super(), "reset_parameters", None)
        if base_reset is not None:
            base_reset()
        from lightning_lora.core.initializers import initialize_adapter, weight_dependent_init

        for name, settings in self.lora_settings.items():
            if weight_dependent_init(settings.init):
                settings.initialized = False
            else:
                initialize_adapter(self, name)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Runs before the adapter tensors (child ParameterDicts) are loaded: restored adapters are marked
        # initialised, and a residual base weight is rebuilt from restored initial factors (no SVD is re-run).
        from lightning_lora.core.state import prepare_layer_load

        prepare_layer_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        adapters = ", ".join(
            f"{name}(r={s.r}, alpha={s.alpha:g}{', dora' if s.variant == 'dora' else ''})"
            for name, s in self.lora_settings.items()
        )
        return f"{base}, adapters=[{adapters}]" if base else f"adapters=[{adapters}]"

    def __reduce_ex__(self, protocol: int) -> Any:
        # The LoRA class is built at run time; pickle it as (kind mixin, base class), both importable.
        return _rebuild_lora_module, (self.kind_mixin, self.base_class), self.__dict__.copy()


def _rebuild_lora_module(kind_mixin: type[LoraLayer], base_class: type[nn.Module]) -> nn.Module:
    return object.__new__(lora_class(kind_mixin, base_class))


@functools.cache
def lora_class(kind_mixin: type[LoraLayer], base_class: type[nn.Module]) -> type[LoraLayer]:
    """The LoRA subclass of ``base_class`` for one layer kind, e.g. ``LoraLinear(LinearAdapters, nn.Linear)``."""
    return type(
        f"Lora{base_class.__name__}",
        (kind_mixin, base_class),
        {"base_class": base_class, "kind_mixin": kind_mixin, "__module__": __name__},
    )


class LinearAdapters(LoraLayer):
    """Adapters on ``nn.Linear`` (and subclasses such as bitsandbytes ``Linear4bit``): weight ``[out, in]``."""

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_features, self.out_features, ()

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        return F.linear(F.linear(h, lora_A) * scaling, lora_B)


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
        output = (looked_up * scaling) @ lora_B.t()
        embed_scale = getattr(self, "embed_scale", None)
        return output if embed_scale is None else output * embed_scale.to(output.dtype)


class ConvAdapters(LoraLayer):
    """Adapters on ``nn.Conv1d/2d/3d``: ``A`` is a convolution with the base kernel, stride, padding and dilation;
    ``B`` a 1x1 convolution, so ``B @ A`` is a kernel of the base's shape and merging is exact."""

    _CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_channels, self.out_channels, tuple(self.kernel_size)

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        hidden = self._conv_forward(h, lora_A, None)  # the base's own geometry, padding_mode included
        return self._CONV_FN[lora_B.dim()](hidden * scaling, lora_B)

    def channel_view(self, per_channel: torch.Tensor) -> torch.Tensor:
        return per_channel.view(1, -1, *([1] * len(self.kernel_size)))


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers is not a dependency: recognise its Conv1D by name and shape attributes.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def adapter_kind(module: nn.Module) -> Optional[type[LoraLayer]]:
    """The layer-kind mixin that can adapt ``module``, or None when the type is not supported."""
    if isinstance(module, LoraLayer):
        return module.kind_mixin
    if isinstance(module, nn.Linear):
        return LinearAdapters
    if _is_hf_conv1d(module):
        return TransposedLinearAdapters
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapters
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return None
        return ConvAdapters
    return None


SUPPORTED_LAYERS = "nn.Linear, Hugging Face Conv1D, nn.Embedding, nn.Conv1d/2d/3d (groups=1)"


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer in ``model`` with its qualified name.

    Args:
        model: Any module.
    """
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]

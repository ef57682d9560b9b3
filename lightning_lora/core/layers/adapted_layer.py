"""Adapted layers: named adapters of any kind added in place to an existing base layer.

An adapted layer ("LoRA layer", whatever the kind) is the user's own module with its class swapped for a subclass
that puts :class:`LoraLayer` in front of the original class (``nn.Linear`` becomes
``LoraLinear(LinearAdapters, nn.Linear)``), the same idiom FSDP2's ``fully_shard`` uses. So the module keeps its
parameters, its state-dict keys (``q_proj.weight``), its own forward (reached through ``super().forward``),
``isinstance`` checks and quantised storage; the adapters live beside the weight (LoRA: ``q_proj.lora_A.<adapter>``
and ``q_proj.lora_B.<adapter>``). Removing the adapters swaps the class back.

The adapters themselves are of a kind (LoRA, DoRA, LoHa, ...: :mod:`lightning_lora.core.kinds`): the kind declares
its tensors, computes and merges. One mixin per layer type (linear, Hugging Face ``Conv1D``, embedding, convolution:
:mod:`lightning_lora.core.layers.layer_types`) gives the geometry every kind works through: dims, weight layout, how
low-rank factors or a dense weight apply to an input. Everything else is shared.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.common.base_weights import dense_weight
from lightning_lora.core.common.distributed import gathered_parameters, is_materialized
from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.layers.containers import AdapterDict, AdapterTensor

if TYPE_CHECKING:
    from lightning_lora.core.layers.forward_plan import ForwardPlan

Action = Literal["add", "rescale", "transform"]


class LayerKind(Protocol):
    """What code below the kinds (the adapted layer, the inits) asks of an adapter's kind: the part of the kind
    protocol (:class:`~lightning_lora.core.kinds.base.AdapterKind`, which documents each member) they call. Declared
    here so that they depend on no kind."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    action: ClassVar[Action]
    containers: ClassVar[tuple[str, ...]]

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]: ...

    def scaling(self, settings: AdapterSettings) -> float: ...

    def describe(self, settings: AdapterSettings) -> str: ...

    def reads_base_weight(self, config: AdapterConfig) -> bool: ...

    def init_name(self, config: AdapterConfig) -> Optional[str]: ...

    def initialize(self, layer: LoraLayer, adapter_name: str) -> None: ...

    def prepare_load(
        self, layer: LoraLayer, adapter_name: str, state_dict: Mapping[str, torch.Tensor], prefix: str
    ) -> None: ...

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor: ...

    def transformed_forward(
        self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, base_forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor: ...

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor: ...


@dataclass
class AdapterSettings:
    """What one adapter is on one layer: its kind, resolved rank, scale and dropout, and the config it came from.

    ``active_rank`` (LoRA only, :mod:`lightning_lora.core.kinds.nested_rank`): compute with the first ``active_rank``
    ranks (DyLoRA); ``active_rank_update`` says which of them get gradients (``"nested"``: all, ``"last"``: the last
    one). ``token_indices``: the embedding rows that train, and ``token_source``: on an output head tied to that
    embedding, the embedding layer whose rows it uses (:mod:`lightning_lora.core.kinds.trainable_tokens`).
    """

    r: int
    alpha: float
    dropout: float
    kind: LayerKind
    config: AdapterConfig
    initialized: bool = False
    active_rank: Optional[int] = None
    active_rank_update: str = "nested"
    token_indices: tuple[int, ...] = ()
    token_source: Optional[LoraLayer] = None

    @property
    def scaling(self) -> float:
        return self.kind.scaling(self)


class LoraLayer(nn.Module):
    """Adapter bookkeeping and forward shared by every adapted layer type. Never instantiated directly.

    Each adapter's tensors live in ``nn.ParameterDict`` attributes named by its kind (``lora_A``, ``hada_w1_a``, ...)
    and keyed by adapter name, so state-dict keys read ``<layer>.<container>.<adapter>``.

    Attributes:
        lora_settings: ``{adapter: AdapterSettings}``.
        active_adapters: Adapters that take part in forward, in order.
        merged_adapters: Adapters currently folded into the base weight.
        adapters_disabled: When True, forward is the base layer's alone.
        forward_plan: What takes over the call for a while (a mixed-adapter batch, X-LoRA's gate, AM-LoRA's
            selector; :mod:`lightning_lora.core.layers.forward_plan`), or None.
    """

    # Set by the layer-type mixins.
    weight_is_transposed: bool = False  # weight stored as [in, out] (HF Conv1D, nn.Embedding)
    applies_dropout: bool = True  # False where the input is not a feature vector (token indices)
    base_class: type[nn.Module]
    layer_type: type[LoraLayer]
    forward_plan: ForwardPlan | None = None  # an instance attribute only while a plan holds the layer

    def _init_lora_state(self) -> None:
        self.lora_settings: dict[str, AdapterSettings] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.merge_state: dict[str, torch.Tensor] = {}  # what a kind needs to undo its merge (DoRA: norms)

    # ----- what each layer type provides -----
    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        """``(in_features, out_features, kernel_size)`` as seen by the adapter."""
        raise NotImplementedError

    def weight_dims(self) -> tuple[int, int, tuple[int, ...]]:
        """``(in, out, kernel_size)`` of the dense weight the base computes with: :meth:`lora_dims`, except that a
        grouped convolution's kernel reads ``in_channels / groups`` channels."""
        return self.lora_dims()

    def lora_output(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``scaling * B(A(h))`` for factors of :meth:`adapter_shapes`, shaped like the base output. Layer types
        scale the rank-``r`` intermediate, which is ``out / r`` times smaller than the output."""
        raise NotImplementedError

    def dense_output(self, h: torch.Tensor, weight_out_in: torch.Tensor) -> torch.Tensor:
        """The base layer's operation (its geometry, no bias) with another dense ``[out, in, *kernel]`` weight."""
        raise NotImplementedError

    def add_lora_output(
        self, result: torch.Tensor, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """``result + scaling * B(A(h))`` in ``result``'s dtype; layer types may fuse the steps."""
        update = self.lora_output(h, lora_A, lora_B, scaling)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

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
        """Shapes of low-rank factors ``A`` (``[r, in, *kernel]``) and ``B`` (``[out, r, *ones]``) on this layer."""
        in_features, out_features, kernel = self.lora_dims()
        return (r, in_features, *kernel), (out_features, r, *(1 for _ in kernel))

    def scaling(self, adapter_name: str) -> float:
        return self.lora_settings[adapter_name].scaling

    def weight_key(self, layer_name: str) -> str:
        """The state-dict key of the adapted weight, for the layer named ``layer_name``."""
        return f"{layer_name}.weight" if layer_name else "weight"

    def peft_name(self, layer_name: str) -> str:
        """The name PEFT gives this layer's adapters (the layer's own name here)."""
        return layer_name

    def low_rank_product(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """``B @ A`` for factors of :meth:`adapter_shapes`, as a dense ``[out, in, *kernel]`` tensor."""
        in_features, out_features, kernel = self.lora_dims()
        return (lora_B.flatten(1) @ lora_A.flatten(1)).reshape(out_features, in_features, *kernel)

    def weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """View a tensor in the base weight's layout as ``[out, in, *kernel]`` (and back: the view is its own
        inverse)."""
        return weight.t() if self.weight_is_transposed else weight

    def to_weight_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """A ``[out, in, *kernel]`` update in the base weight's own layout and dtype."""
        weight = self.weight
        delta = self.weight_out_in(delta_out_in)
        return delta.to(weight.dtype) if weight.is_floating_point() else delta

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as a dense ``[out, in, *kernel]`` tensor (dequantised if needed)."""
        return self.weight_out_in(dense_weight(self))

    def adapter_containers(self, adapter_name: str) -> list[str]:
        """Names of the ``ParameterDict`` attributes holding this layer's own tensors of ``adapter_name``, in the
        kind's order (tensors shared by all layers, :class:`SharedTensors`, are not among them)."""
        return [
            c
            for c in self.lora_settings[adapter_name].kind.containers
            if isinstance(container := self._modules.get(c), AdapterDict) and adapter_name in container
        ]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's dense update in the base weight's layout and dtype (see the kind's ``delta_weight``)."""
        return self.lora_settings[adapter_name].kind.delta_weight(self, adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_forward = super().forward
        if self.adapters_disabled:
            return base_forward(x, *args, **kwargs)
        if self.forward_plan is not None:
            return self.forward_plan.forward(self, x, base_forward, args, kwargs)
        pending = []
        transform = None  # a kind that transforms what the base computes (OFT) runs the base operation itself
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                settings = self.lora_settings[name]
                if not settings.initialized:
                    self._raise_uninitialized(name)
                if settings.kind.action == "transform":
                    transform = name
                else:
                    pending.append(name)
        if transform is None:
            result = base_forward(x, *args, **kwargs)
        else:
            kind = self.lora_settings[transform].kind
            result = kind.transformed_forward(self, transform, x, lambda inputs: base_forward(inputs, *args, **kwargs))
        for name in pending:
            result = self.lora_settings[name].kind.forward(self, name, x, result)
        return result

    def _raise_uninitialized(self, adapter_name: str) -> None:
        if self.weight.is_meta:
            return
        settings = self.lora_settings[adapter_name]
        raise RuntimeError(
            f"Adapter {adapter_name!r} ({settings.kind.describe(settings)}) "
            "is not initialised yet: it was added on the meta device, re-created by reset_parameters(), or added "
            "with initialize=False. Load the real base weights, then call "
            "lightning_lora.initialize_pending_adapters(model) (or load the adapter's saved state)."
        )

    @torch.no_grad()
    def initialize_adapter(self, adapter_name: str) -> bool:
        """Run the kind's init for one adapter. Returns False (the adapter stays pending) while the layer's weights
        are on the meta device. DeepSpeed ZeRO-3 partitions are gathered for the duration (rank 0's result is kept).
        """
        settings = self.lora_settings[adapter_name]
        with gathered_parameters(self):
            tensors = [getattr(self, name)[adapter_name] for name in self.adapter_containers(adapter_name)]
            if not all(is_materialized(t) for t in [self.weight, *tensors]):
                settings.initialized = False
                return False
            settings.kind.initialize(self, adapter_name)
        settings.initialized = True
        return True

    def reset_parameters(self) -> None:
        """Re-initialise the base layer as its class does, then the adapters (used to materialise a meta model).

        Adapters whose init reads the base weight (PiSSA, OLoRA, ...) are left pending: the weight is still a
        placeholder here. :func:`~lightning_lora.core.surgery.inject.initialize_pending_adapters` runs them once the
        real weights are loaded.
        """
        base_reset = getattr(super(), "reset_parameters", None)
        if base_reset is not None:
            base_reset()
        for name, settings in self.lora_settings.items():
            if settings.kind.reads_base_weight(settings.config):
                settings.initialized = False
            else:
                self.initialize_adapter(name)

    def prepare_load(
        self, state_dict: Mapping[str, torch.Tensor], prefix: str, adapter_names: Optional[list[str]] = None
    ) -> None:
        """Get ready for adapter tensors that ``state_dict`` is about to restore (before they are copied).

        An adapter whose tensors the state dict restores counts as initialised from then on, so
        ``initialize_pending_adapters`` never re-runs its init over the restored values; its kind may adjust the
        base weight first (an SVD init's residual is rebuilt from restored initial factors).

        Args:
            state_dict: The incoming state, keyed like the model's (``<prefix><container>.<adapter>``).
            prefix: The layer's key prefix in ``state_dict`` (``"model.layers.0.q_proj."``).
            adapter_names: Only these adapters (default: every adapter of the layer).
        """
        for adapter_name, settings in self.lora_settings.items():
            if adapter_names is not None and adapter_name not in adapter_names:
                continue
            containers = self.adapter_containers(adapter_name)
            keys = [f"{prefix}{name}.{adapter_name}" for name in containers]
            targets = [getattr(self, name)[adapter_name] for name in containers]
            if not any(restores(state_dict, key, target) for key, target in zip(keys, targets)):
                continue
            settings.kind.prepare_load(self, adapter_name, state_dict, prefix)
            settings.initialized = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Runs before the adapter tensors (child ParameterDicts) are loaded.
        self.prepare_load(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        adapters = ", ".join(f"{name}({s.kind.describe(s)})" for name, s in self.lora_settings.items())
        return f"{base}, adapters=[{adapters}]" if base else f"adapters=[{adapters}]"

    def __reduce_ex__(self, protocol: int) -> Any:
        # The LoRA class is built at run time; pickle it as (layer type, base class), both importable.
        return _rebuild_lora_module, (self.layer_type, self.base_class), self.__dict__.copy()


def restores(state_dict: Mapping[str, torch.Tensor], key: str, parameter: torch.Tensor) -> bool:
    """Whether ``state_dict`` brings a new value for ``parameter`` under ``key``.

    A value that is the parameter's own storage carries nothing new: torch.distributed.checkpoint's
    set_model_state_dict passes the module's own parameters for keys its caller did not provide, and Lightning-layer
    loads fill what an adapter-only checkpoint leaves out with the model's own (detached) tensors.
    """
    if key not in state_dict:
        return False
    return _storage(state_dict[key]) != _storage(parameter)


def _storage(tensor: torch.Tensor) -> tuple[int, str]:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.data_ptr(), str(local.device)


def _rebuild_lora_module(layer_type: type[LoraLayer], base_class: type[nn.Module]) -> nn.Module:
    return object.__new__(lora_class(layer_type, base_class))


@functools.cache
def lora_class(layer_type: type[LoraLayer], base_class: type[nn.Module]) -> type[LoraLayer]:
    """The adapted subclass of ``base_class`` for one layer type, e.g. ``LoraLinear(LinearAdapters, nn.Linear)``."""
    return type(
        f"Lora{base_class.__name__}",
        (layer_type, base_class),
        {"base_class": base_class, "layer_type": layer_type, "__module__": __name__},
    )


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every adapted layer in ``model`` (adapters of any kind) with its qualified name.

    Args:
        model: Any module.
    """
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]

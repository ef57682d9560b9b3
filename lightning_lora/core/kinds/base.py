"""The adapter-kind protocol: what one kind of adapter (LoRA, DoRA, LoHa, ...) declares and computes on one layer.

A kind is one :class:`AdapterKind` subclass in one file of this folder, plus one line in the registry
(:data:`lightning_lora.core.kinds.KINDS`). Everything generic (injection and rollback, trainability, adapter state
dicts, delete and unload, merging, native and PEFT files, parameter groups, checkpoints) asks the kind through this
interface and never names a kind's tensors. Layer types (``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding``,
``nn.ConvNd``) are the other axis: :class:`~lightning_lora.core.layers.adapted_layer.LoraLayer` mixins give the geometry
(dims, weight layout, how to apply factors or a dense weight) and every kind works through them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

import torch
from torch import nn

from lightning_lora.core.common.distributed import full_tensor
from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.layers.adapted_layer import Action, LayerKind
from lightning_lora.core.layers.containers import AdapterTensor

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

__all__ = ["Action", "AdapterKind", "AdapterTensor"]


class AdapterKind(LayerKind):
    """How one kind of adapter lives on a layer, computes, merges and is written in PEFT's format.

    Attributes:
        name: Registry key, the ``kind`` of its config.
        display_name: How messages name it (``"DoRA"``).
        peft_type: PEFT's ``peft_type`` for files of this kind.
        action: How it acts on the layer: ``"add"`` (adds to the base output: LoRA, LoHa, LoKr), ``"rescale"``
            (rescales everything computed before it: DoRA) or ``"transform"`` (transforms the input or the weight
            the base uses: OFT). Merge rules read this: only ``"add"`` kinds merge together with others.
        containers: Every layer attribute the kind may create (static; the union over layers and options).
        config_class: The kind's config class.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    peft_type: ClassVar[str]
    action: ClassVar[Action] = "add"
    containers: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[AdapterConfig]]
    #: PEFT fields read by :meth:`config_from_peft` beyond the targeting fields and alpha; any other non-default
    #: field of a PEFT file is refused by name.
    peft_fields: ClassVar[frozenset[str]] = frozenset()
    #: The PEFT field of the scale numerator of rank-``r`` kinds (``"lora_alpha"``, ``"alpha"``); None for kinds
    #: without ranks and alphas per layer (their ``r`` and options are all in :meth:`peft_config_fields`).
    peft_alpha_field: ClassVar[Optional[str]] = "alpha"
    peft_bias_only: ClassVar[str] = "lora_only"  # PEFT's name for "biases of adapted layers" (OFT: "oft_only")
    #: Whether the update is ``scaling * B A`` of ``lora_A``/``lora_B`` factors (a bias on B aside): what nested
    #: ranks (DyLoRA), LoRA-FA's projection and factor-wise combination slice or project.
    lora_factors: ClassVar[bool] = False
    #: Whether the adapter's ranks follow a budget schedule (AdaLoRA's rank allocation).
    rank_budget: ClassVar[bool] = False
    vllm_servable: ClassVar[bool] = False
    #: Whether it can adapt a grouped convolution (``groups > 1``): a low-rank update grouped like the base.
    adapts_grouped_convolutions: ClassVar[bool] = False
    #: Whether its :meth:`shared_tensors` train with the adapter (VB-LoRA's vector bank): each is then one
    #: ``nn.Parameter`` held by the module containing all the adapter's layers, among the adapter's parameters (state
    #: dicts, checkpoints, optimizers, files) once; otherwise they are frozen buffers outside state dicts (VeRA's).
    trains_shared: ClassVar[bool] = False

    def __deepcopy__(self, memo: dict) -> AdapterKind:
        return self  # kinds hold no state: a copied model's layers share them

    # ----- declarations -----
    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        """The tensors one adapter with ``settings`` keeps on ``layer``."""
        raise NotImplementedError

    def shared_tensors(self, config: AdapterConfig, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
        """Tensors held once per model for all the adapter's layers (``{container: tensor}``: VeRA's frozen
        projections, VB-LoRA's trainable vector bank, see :attr:`trains_shared`), built (and initialised) from the
        config and every targeted layer; raise a ValueError naming the fix when they cannot be. Each layer sees them
        as ``layer.<container>[adapter]``."""
        return {}

    def saves_shared(self, config: AdapterConfig) -> bool:
        """Whether adapter files hold the frozen shared tensors (once), rather than rebuilding them from the config
        (trainable ones are always saved, as adapter parameters)."""
        return True

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        """Raise a ValueError naming the fix when the kind cannot adapt ``module`` with ``settings`` (layer type,
        rank or block size that does not fit). ``module`` may still be the plain base layer."""

    def parameter_site_refusals(self, config: AdapterConfig) -> list[str]:
        """What keeps this adapter off parameter sites (``target_parameters``, ``nn.MultiheadAttention``'s packed
        weights, where the update adds to a weight rather than to an output), named for the error; empty: none."""
        return ["a kind other than LoRA"]

    def has_bias(self, config: AdapterConfig) -> bool:
        """Whether the adapter trains a bias of its own (LoRA's ``lora_bias``), which merging adds to the base's."""
        return False

    def layer_dropout(self, config: AdapterConfig) -> float:
        """Dropout on the adapter's input (LoRA's ``dropout``); 0 for kinds without one."""
        return 0.0

    def scaling(self, settings: AdapterSettings) -> float:
        """The factor applied to the adapter's update: ``alpha / r`` unless the kind says otherwise."""
        return settings.alpha / settings.r

    def describe(self, settings: AdapterSettings) -> str:
        """A short description for ``repr``."""
        return f"{self.name}, r={settings.r}, alpha={settings.alpha:g}"

    # ----- initialisation -----
    def reads_base_weight(self, config: AdapterConfig) -> bool:
        """Whether the init reads (or rewrites) the base weight, so it must wait for the real weights."""
        return False

    def init_name(self, config: AdapterConfig) -> Optional[str]:
        """The registered init the adapter starts from (``LoraConfig.init``), or None where the kind has no choice of
        init."""
        return None

    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        """Fill the adapter's tensors (under ``torch.no_grad``)."""
        raise NotImplementedError

    def after_base_change(self, layer: LoraLayer, adapter_name: str) -> None:
        """The base weight changed under an initialised adapter (quantisation): refresh what depends on it."""

    def prepare_load(
        self, layer: LoraLayer, adapter_name: str, state_dict: Mapping[str, torch.Tensor], prefix: str
    ) -> None:
        """Called before a state dict restores this adapter's tensors (``<prefix><container>.<adapter>``)."""

    def release_base(self, layer: LoraLayer, adapter_name: str) -> None:
        """Called before the adapter leaves the layer: give back what its init took from the base weight."""

    # ----- computation -----
    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Return ``result`` (the layer's output so far) with this adapter's contribution for input ``x``."""
        raise NotImplementedError

    def transformed_forward(
        self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, base_forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """For ``"transform"`` kinds: the layer's whole output with this adapter, computing the base operation at
        most once through ``base_forward(inputs)``."""
        raise NotImplementedError(f"{self.display_name} does not transform the base operation")

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """The adapter's dense update in the base weight's own layout and dtype (for ``"add"`` kinds)."""
        raise NotImplementedError

    def factors(self, layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """For kinds with :attr:`lora_factors`: ``(A, B)`` as the forward computes with them (their active ranks)."""
        raise NotImplementedError(f"{self.display_name} has no low-rank factors")

    def plain_factors(self, settings: AdapterSettings) -> bool:
        """Whether the update is exactly ``scaling * B A`` and nothing else (no bias on B): what X-LoRA experts and
        AM-LoRA's low-rank path compute with."""
        return False

    def bias_delta(self, layer: LoraLayer, adapter_name: str) -> Optional[torch.Tensor]:
        """What merging adds to the base layer's bias (``[out]``), or None for adapters without a bias of their
        own (LoRA's ``lora_bias``)."""
        return None

    def check_mergeable(self, layer: LoraLayer, layer_name: str, adapter_name: str) -> None:
        """Raise a ValueError naming the fix when this adapter cannot fold into ``layer``'s base weight."""

    def merged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The dense base ``weight`` (the layer's own layout) with this adapter folded in; ``weight`` is not changed.

        Args:
            layer: The adapted layer.
            adapter_name: The adapter to fold in.
            weight: The current dense weight.
            record: Where to keep what :meth:`unmerged_weight` will need, under ``adapter_name`` (a merge into the
                live layer passes ``layer.merge_state``; a merged copy passes a throwaway dict).
        """
        return weight + self.delta_weight(layer, adapter_name)

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`, given the ``record`` it filled."""
        return weight - self.delta_weight(layer, adapter_name)

    # ----- PEFT format -----
    def peft_tensor_leaf(self, layer: LoraLayer, container: str) -> str:
        """PEFT's key for one of the adapter's tensors, relative to the layer (``"lora_A.weight"``)."""
        return container

    def peft_tensor_shape(self, layer: LoraLayer, container: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape PEFT stores a tensor in (the same unless PEFT keeps another layout)."""
        return shape

    def peft_config_fields(self, config: AdapterConfig) -> dict[str, Any]:
        """The kind's own fields of PEFT's ``adapter_config.json`` (the targeting fields are written generically)."""
        raise NotImplementedError

    def peft_layer_fields(
        self, adapter_name: str, config: AdapterConfig, layers: list[tuple[str, LoraLayer]]
    ) -> dict[str, Any]:
        """Fields of ``adapter_config.json`` that describe the exported ``layers`` one by one (AdaLoRA's
        ``rank_pattern``), named relative to the exported model."""
        return {}

    def peft_file_shapes(
        self, layer: LoraLayer, settings: AdapterSettings, layer_name: str, peft_config: Mapping[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """Shapes (our layout) of the tensors PEFT keeps for ``layer_name`` under ``peft_config``."""
        return {t.name: t.shape for t in self.tensors(layer, settings) if t.trainable}

    def peft_import_tensor(
        self, layer: LoraLayer, adapter_name: str, layer_name: str, container: str, value: torch.Tensor
    ) -> torch.Tensor:
        """A tensor read from a PEFT file, in the shape the layer holds it (AdaLoRA: pruned ranks put back)."""
        return value

    def config_from_peft(self, values: Mapping[str, Any], targeting: dict[str, Any]) -> AdapterConfig:
        """Build the kind's config from a PEFT config dict; ``targeting`` holds the shared fields already parsed
        (fields outside ``peft_fields`` were refused by name before). By default each of ``peft_fields`` is the
        config field of the same name; PEFT's ``<kind>_only`` bias is ``lora_only`` here."""
        fields = {name: values[name] for name in self.peft_fields - {"fan_in_fan_out"} if values.get(name) is not None}
        if fields.get("bias") == self.peft_bias_only:
            fields["bias"] = "lora_only"
        return self.config_class(**targeting, **fields)

    def peft_bias(self, config: AdapterConfig) -> str:
        """``config.bias`` as PEFT's config of this kind names it."""
        return self.peft_bias_only if config.bias == "lora_only" else config.bias

    def peft_export(self, layer: LoraLayer, adapter_name: str) -> tuple[dict[str, torch.Tensor], int, float]:
        """``({container: whole tensor}, r, alpha)`` of one layer as PEFT stores it: the trainable tensors as they
        are, unless the kind converts them (LoRA's SVD inits)."""
        settings = layer.lora_settings[adapter_name]
        trainable = [t.name for t in self.tensors(layer, settings) if t.trainable]
        tensors = {name: full_tensor(getattr(layer, name)[adapter_name].detach()) for name in trainable}
        return tensors, settings.r, settings.alpha

    def peft_save_tensors(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A PEFT file's tensors (PEFT keys) as the kind's PEFT files store them, after the export checks (VB-LoRA's
        ``save_only_topk_weights``: the top-k weights and indices of its logits); the same by default."""
        return tensors

    def peft_load_tensors(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`peft_save_tensors`, for a PEFT file about to be read: its tensors under the keys of
        :meth:`peft_tensor_leaf`."""
        return tensors

    def check_peft_export(self, adapter_name: str, config: AdapterConfig, layers: list[tuple[str, LoraLayer]]) -> None:
        """Raise a ValueError naming the fix when PEFT's format cannot hold this adapter exactly."""

    def check_file_state(
        self,
        adapter_name: str,
        config: AdapterConfig,
        layers: list[tuple[str, LoraLayer]],
        state: Mapping[str, torch.Tensor],
    ) -> None:
        """Raise a ValueError naming the fix when a file's config contradicts its tensors in a way their shapes do
        not show (the load compares every key and shape with the model generically, before this).

        Args:
            adapter_name: The adapter being loaded.
            config: The config read from the file.
            layers: ``(name, layer)`` of every layer the adapter is on.
            state: The file's tensors, keyed like :func:`~lightning_lora.core.files.state.adapter_state_dict`.
        """

    def fold_for_vllm(
        self, tensors: dict[str, torch.Tensor], r: int, scaling: float, rank: int, new_scaling: float
    ) -> dict[str, torch.Tensor]:
        """The tensors re-expressed at the global ``rank`` and ``new_scaling`` vLLM reads (``vllm_servable`` kinds)."""
        raise NotImplementedError(f"vLLM does not serve {self.name} adapters.")


def refuse_meta_targets(kind: AdapterKind, shared: str, targets: list[tuple[str, nn.Module]]) -> None:
    """Raise the standard error when a kind that builds ``shared`` tensors from real weights meets meta ones.

    Args:
        kind: The kind building them (its ``display_name`` is in the message).
        shared: What it builds, as the message names it (``"shared projections"``).
        targets: ``(name, module)`` of every targeted layer.
    """
    meta = [name for name, module in targets if module.weight.is_meta]
    if meta:
        raise ValueError(
            f"{kind.display_name} builds its {shared} when it is added, but {meta[0]} is on the meta device. Add "
            f"{kind.display_name} after the real weights are in place (build the model in __init__, or load the "
            "weights before apply_lora)."
        )


def rank_fits(layer_name: str, module: nn.Module, r: int, max_rank: int) -> None:
    """Raise the standard error for a rank larger than a layer allows."""
    if r > max_rank:
        raise ValueError(
            f"Rank r={r} is too large for {layer_name} ({type(module).__name__}): at most {max_rank}. Lower r, or "
            f"set a smaller rank for it with rank_pattern={{{layer_name.split('.')[-1]!r}: {max_rank}}}."
        )

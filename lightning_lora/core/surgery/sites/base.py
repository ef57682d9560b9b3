"""The protocol of a target type: what ``apply_lora`` adapts is planned by one planner per target type (layers,
``nn.MultiheadAttention``'s packed weights, embedding rows, named parameters), every check made before the first
change; the plan is then carried out under one snapshot-and-rollback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.kinds import KINDS, kind_of
from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer, lora_class
from lightning_lora.core.layers.layer_types import layer_type_of


@dataclass
class PlannedSite:
    """One place the adapter goes.

    Args:
        name: The name messages and ``unmet_requests`` know it by (a layer's name; the owner's for parameter sites).
        attach: Makes the adapted layer (swapping a module's class, or adding a parameter site) and returns it; runs
            only once every site is planned.
        settings: The adapter's settings on the layer ``attach`` returned.
        layer: The module adapted as itself, where its own forward is adapted (quantisation, a kind's shared tensors
            and trained biases apply to it); None for other sites.
    """

    name: str
    attach: Callable[[], LoraLayer]
    settings: Callable[[LoraLayer], AdapterSettings]
    layer: Optional[nn.Module] = None


@dataclass
class TargetContext:
    """What the planners of one ``apply_lora`` call share.

    Args:
        model: The model.
        config: The adapter's config.
        candidates: ``(name, module)`` of the modules ``config`` selects (``find_targets``).
        modules_to_save: The modules ``config.modules_to_save`` trains whole.
        planned: The sites planned so far, by earlier planners.
        claimed: The candidates a planner took for itself (no later planner adapts them again).
    """

    model: nn.Module
    config: AdapterConfig
    candidates: list[tuple[str, nn.Module]]
    modules_to_save: dict[str, nn.Module]
    planned: list[PlannedSite] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)

    def unclaimed(self) -> list[tuple[str, nn.Module]]:
        """The candidates no planner has taken yet."""
        return [(name, module) for name, module in self.candidates if id(module) not in self.claimed]


class TargetPlanner(Protocol):
    """One target type: plans its sites from the context, raising a ValueError naming the fix before any change."""

    def plan(self, context: TargetContext) -> list[PlannedSite]: ...


def settings_for(name: str, module: nn.Module, config: AdapterConfig) -> AdapterSettings:
    """The adapter's settings on ``module`` (rank and alpha by ``name``), checked by its kind.

    Args:
        name: The name the config's rank and alpha patterns match (the layer's; the owner's for attention sites).
        module: The layer (or parameter site) the adapter goes on.
        config: The adapter's config.

    Raises:
        ValueError: The kind cannot adapt the module with these settings.
    """
    kind = kind_of(config)
    settings = AdapterSettings(
        r=config.rank_for(name),
        alpha=config.alpha_for(name),
        dropout=kind.layer_dropout(config) if layer_type_of(module).applies_dropout else 0.0,
        kind=kind,
        config=config,
    )
    if getattr(module, "groups", 1) > 1 and not kind.adapts_grouped_convolutions:
        able = [k.display_name for k in KINDS.values() if k.adapts_grouped_convolutions]
        raise ValueError(
            f"{name} is a grouped convolution (groups={module.groups}), which {kind.display_name} cannot adapt (as "
            f"PEFT); {', '.join(able)} can. Leave it out with exclude_modules, or use one of those kinds for it."
        )
    kind.check_layer(name, module, settings)
    return settings


def adapted(module: nn.Module) -> LoraLayer:
    """``module`` as an adapted layer: its class swapped for the adapted one (once).

    Args:
        module: A module of a supported layer type, or one already adapted.
    """
    if not isinstance(module, LoraLayer):
        module.__class__ = lora_class(layer_type_of(module), type(module))
        module._init_lora_state()
    return module


def check_parameter_site_options(config: AdapterConfig, where: str, with_dropout: bool) -> None:
    """Refuse, by the options the kind names, an adapter that cannot sit on parameter sites (as PEFT refuses it).

    Args:
        config: The adapter's config.
        where: What the sites are, for the message's start.
        with_dropout: Whether dropout is refused too (named parameters: the update adds to the weight).
    """
    kind = kind_of(config)
    refused = kind.parameter_site_refusals(config)
    if with_dropout and kind.layer_dropout(config):
        refused = ["dropout", *refused]
    if refused:
        raise ValueError(f"{where}; drop {refused}.")

"""Named parameters (``target_parameters``): weights a module computes with directly, such as fused
mixture-of-experts tensors, get a parameter site each (PEFT's ``ParamWrapper``)."""

from __future__ import annotations

from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.parameter_adapters import adapt_parameter, find_parameter_targets, site_name
from lightning_lora.core.surgery.sites.base import (
    PlannedSite,
    TargetContext,
    check_parameter_site_options,
    settings_for,
)


class ParameterTargets:
    """Every parameter ``config.target_parameters`` names, on a module no other target type adapts."""

    def plan(self, context: TargetContext) -> list[PlannedSite]:
        found = find_parameter_targets(context.model, context.config)
        if not found:
            return []
        check_parameter_site_options(
            context.config,
            "target_parameters works with plain LoRA without dropout, a bias on B or an SVD init (as in PEFT: the "
            "update adds to the weight, not to an output)",
            with_dropout=True,
        )
        twice = [f"{owner_name}.{p}" for owner_name, owner, p in found
                 if isinstance(owner, LoraLayer) or id(owner) in context.claimed]  # fmt: skip
        if twice:
            raise ValueError(
                f"target_parameters names {twice[:3]}, parameters of layers that target_modules adapts (or that "
                "carry adapters already); adapt each layer one way (PEFT refuses this too). Narrow one of the two."
            )
        return [
            PlannedSite(
                site_name(owner_name, parameter_name),
                lambda owner=owner, p=parameter_name: adapt_parameter(owner, p),
                lambda site, n=site_name(owner_name, parameter_name): settings_for(n, site, context.config),
            )
            for owner_name, owner, parameter_name in found
        ]

"""``nn.MultiheadAttention``: its forward computes with ``in_proj_weight`` and ``out_proj.weight`` directly, so LoRA
goes on both weights as parameter sites (PEFT's layout)."""

from __future__ import annotations

from lightning_lora.core.layers.parameter_adapters import adapt_parameter, whole_module_sites
from lightning_lora.core.surgery.sites.base import (
    PlannedSite,
    TargetContext,
    check_parameter_site_options,
    settings_for,
)


class AttentionSites:
    """Selected modules whose forward never reaches a layer: one site per weight they compute with."""

    def plan(self, context: TargetContext) -> list[PlannedSite]:
        sites = []
        for name, module in context.unclaimed():
            paths = whole_module_sites(name, module, context.config)
            if not paths:
                continue
            check_parameter_site_options(
                context.config,
                f"{name} (nn.MultiheadAttention) takes plain LoRA on its packed in_proj and out_proj, as in PEFT",
                with_dropout=False,
            )
            context.claimed.add(id(module))
            for parameter_name, peft_path in paths:
                sites.append(PlannedSite(
                    name,
                    lambda owner=module, p=parameter_name, path=peft_path: adapt_parameter(owner, p, path),
                    lambda site, n=name: settings_for(n, site, context.config),  # rank and alpha by the module's name
                ))  # fmt: skip
        return sites

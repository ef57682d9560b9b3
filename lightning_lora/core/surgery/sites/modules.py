"""Layers adapted as themselves (``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding``, ``nn.ConvNd``)."""

from __future__ import annotations

from lightning_lora.core.surgery.sites.base import PlannedSite, TargetContext, adapted, settings_for


class ModuleTargets:
    """Every selected module no earlier planner claimed: its class is swapped for the adapted one."""

    def plan(self, context: TargetContext) -> list[PlannedSite]:
        sites = []
        for name, module in context.unclaimed():
            settings = settings_for(name, module, context.config)
            context.claimed.add(id(module))
            sites.append(PlannedSite(name, lambda m=module: adapted(m), lambda _, s=settings: s, layer=module))
        return sites

"""Rows of an embedding (``trainable_token_indices``): the chosen token rows train, riding in the adapter."""

from __future__ import annotations

from torch import nn

from lightning_lora.core.kinds.trainable_tokens import TRAINABLE_TOKENS, find_token_layers
from lightning_lora.core.layers.adapted_layer import AdapterSettings
from lightning_lora.core.surgery.sites.base import PlannedSite, TargetContext, adapted


class TokenRows:
    """The embeddings (and output heads tied to them) whose rows ``config.trainable_token_indices`` trains."""

    def plan(self, context: TargetContext) -> list[PlannedSite]:
        layer_names = {site.name for site in context.planned if site.layer is not None}
        found: list[tuple[str, nn.Module, PlannedSite]] = []
        for name, module, indices, source in find_token_layers(context.model, context.config):
            if name in layer_names or name in context.modules_to_save:
                where = "target_modules" if name in layer_names else "modules_to_save"
                raise ValueError(
                    f"{name} is in trainable_token_indices and in {where}: train its chosen rows or all of it, not "
                    f"both (as PEFT). Drop it from one of them{' (exclude_modules)' if name in layer_names else ''}."
                )
            settings = AdapterSettings(len(indices), 1.0, 0.0, TRAINABLE_TOKENS, context.config, token_indices=indices)
            if source is not None:  # a head tied to an embedding found before it
                settings.token_source = next(m for n, m, _ in found if n == source)  # adapted in place: the same object
            site = PlannedSite(name, lambda m=module: adapted(m), lambda _, s=settings: s)
            found.append((name, module, site))
        return [site for _, _, site in found]


"""Adapter variants: how an adapter adds to a layer's output and how it folds into the base weight.

A variant is one small file with one :class:`AdapterVariant` subclass, plus an entry in :data:`VARIANTS`.
"""

from __future__ import annotations

from lightning_lora.core.variants.base import AdapterVariant
from lightning_lora.core.variants.dora import DoraVariant
from lightning_lora.core.variants.lora import LoraVariant

VARIANTS: dict[str, AdapterVariant] = {"lora": LoraVariant(), "dora": DoraVariant()}

__all__ = ["VARIANTS", "AdapterVariant", "DoraVariant", "LoraVariant"]

"""The Lightning layer: when adapters are added, trained, checkpointed and merged. The core decides what."""

from lightning_lora.lightning.callback import LoraCallback, inject_adapters
from lightning_lora.lightning.export import AdapterExport
from lightning_lora.lightning.mixin import LoraMixin

__all__ = ["AdapterExport", "LoraCallback", "LoraMixin", "inject_adapters"]

"""The Lightning layer: when adapters are added, trained, checkpointed and merged. The core decides what."""

from lightning_lora.lightning.callback import LoraCallback, inject_adapters
from lightning_lora.lightning.export import AdapterExport
from lightning_lora.lightning.fabric import adapter_checkpoint_filter
from lightning_lora.lightning.loading import load_lora_checkpoint
from lightning_lora.lightning.mixin import LoraMixin
from lightning_lora.lightning.resume import ExactResume
from lightning_lora.lightning.schedules import (
    AdaLoraSchedule,
    AdapterSchedule,
    BaseMovingSchedule,
    DeltaLoraSchedule,
    DyLoraSchedule,
    OLoraSchedule,
    ReLoraSchedule,
)
from lightning_lora.lightning.xlora import XLoraCallback

__all__ = [
    "AdaLoraSchedule",
    "AdapterExport",
    "AdapterSchedule",
    "BaseMovingSchedule",
    "DeltaLoraSchedule",
    "DyLoraSchedule",
    "ExactResume",
    "LoraCallback",
    "LoraMixin",
    "OLoraSchedule",
    "ReLoraSchedule",
    "XLoraCallback",
    "adapter_checkpoint_filter",
    "inject_adapters",
    "load_lora_checkpoint",
]

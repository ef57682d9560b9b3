"""Callbacks that change adapters (and, for some, the base weights) while a ``Trainer`` fits."""

from lightning_lora.lightning.schedules.adalora import AdaLoraSchedule
from lightning_lora.lightning.schedules.amlora import AmLoraSchedule
from lightning_lora.lightning.schedules.base import AdapterSchedule, BaseMovingSchedule
from lightning_lora.lightning.schedules.delta_lora import DeltaLoraSchedule
from lightning_lora.lightning.schedules.dylora import DyLoraSchedule
from lightning_lora.lightning.schedules.olora import OLoraSchedule
from lightning_lora.lightning.schedules.relora import ReLoraSchedule

__all__ = [
    "AdaLoraSchedule",
    "AdapterSchedule",
    "AmLoraSchedule",
    "BaseMovingSchedule",
    "DeltaLoraSchedule",
    "DyLoraSchedule",
    "OLoraSchedule",
    "ReLoraSchedule",
]

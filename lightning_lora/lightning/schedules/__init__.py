"""Callbacks that change adapters while a Trainer fits: one class per algorithm on :class:`AdapterSchedule`."""

from lightning_lora.lightning.schedules.adalora import AdaLoraSchedule
from lightning_lora.lightning.schedules.base import AdapterSchedule

__all__ = ["AdaLoraSchedule", "AdapterSchedule"]

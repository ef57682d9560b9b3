"""lightning-lora: LoRA and its family for PyTorch Lightning.

``lightning_lora.core`` is pure PyTorch; ``lightning_lora.lightning`` is the thin Lightning layer on top.
"""

from lightning_lora.core import *  # noqa: F401,F403
from lightning_lora.core import __all__ as _core_all
from lightning_lora.core.composition.amlora import (
    add_amlora,
    amlora_adapters,
    amlora_l1,
    amlora_weights,
    has_amlora,
    remove_amlora,
    set_amlora_l1_weight,
)
from lightning_lora.lightning import *  # noqa: F401,F403
from lightning_lora.lightning import __all__ as _lightning_all
from lightning_lora.lightning.schedules.amlora import AmLoraSchedule

__version__ = "0.1.0"
__all__ = [*_core_all, *_lightning_all]
__all__ += [  # AM-LoRA (continual learning)
    "AmLoraSchedule",
    "add_amlora",
    "amlora_adapters",
    "amlora_l1",
    "amlora_weights",
    "has_amlora",
    "remove_amlora",
    "set_amlora_l1_weight",
]

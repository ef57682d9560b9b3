"""The adapter kinds: one file each, one line each in :data:`KINDS`.

This registry imports only the kinds themselves; everything generic imports it.
"""

from __future__ import annotations

from typing import Union

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.kinds.adalora import AdaLoraConfig, AdaLoraKind
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor
from lightning_lora.core.kinds.boft import BOFTConfig, BOFTKind
from lightning_lora.core.kinds.dora import DoraKind
from lightning_lora.core.kinds.loha import LoHaConfig, LoHaKind
from lightning_lora.core.kinds.lokr import LoKrConfig, LoKrKind
from lightning_lora.core.kinds.lora import LoraKind
from lightning_lora.core.kinds.oft import OFTConfig, OFTKind
from lightning_lora.core.kinds.trainable_tokens import TRAINABLE_TOKENS
from lightning_lora.core.kinds.vblora import VBLoRAConfig, VBLoRAKind
from lightning_lora.core.kinds.vera import VeraConfig, VeraKind

KINDS: dict[str, AdapterKind] = {
    kind.name: kind for kind in (
        LoraKind(), DoraKind(), LoHaKind(), LoKrKind(), OFTKind(), VeraKind(), AdaLoraKind(), BOFTKind(),
        VBLoRAKind(),
    )
}

# Every ParameterDict an adapted layer may hold, keyed by adapter name: the one list to consult for "is this an
# adapter tensor" (state-dict keys end in ``.<container>.<adapter>``).
ADAPTER_CONTAINERS: tuple[str, ...] = tuple(
    dict.fromkeys(c for kind in (*KINDS.values(), TRAINABLE_TOKENS) for c in kind.containers)
)

# The config classes, for type hints that accept any kind (LightningCLI picks one by ``class_path``; a plain dict
# is read as the first, LoraConfig).
CONFIG_CLASSES: tuple[type[AdapterConfig], ...] = tuple(dict.fromkeys(kind.config_class for kind in KINDS.values()))
AnyAdapterConfig = Union[CONFIG_CLASSES]  # type: ignore[valid-type]


def kind_of(config: AdapterConfig) -> AdapterKind:
    """The kind an adapter config creates."""
    return KINDS[config.kind]


__all__ = [
    "ADAPTER_CONTAINERS",
    "AdaLoraConfig",
    "AdapterKind",
    "AdapterTensor",
    "AnyAdapterConfig",
    "BOFTConfig",
    "CONFIG_CLASSES",
    "KINDS",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "VBLoRAConfig",
    "VeraConfig",
    "kind_of",
]

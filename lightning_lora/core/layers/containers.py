"""Where adapter tensors live on a layer: what one tensor is (declared by its kind), the per-layer dicts keyed by
adapter name, and the tensors a kind holds once per model (frozen or trainable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor that an adapter keeps on a layer.

    Args:
        name: The layer attribute holding it, an ``nn.ParameterDict`` keyed by adapter name (``"lora_A"``); the
            state-dict key is ``<layer>.<name>.<adapter>``.
        shape: Its shape on this layer.
        role: What it is to parameter groups: LoRA's ``"A"`` / ``"B"`` / ``"embedding"`` / ``"magnitude"`` (LoRA+
            treats them apart), ``"adapter"`` for everything else.
        trainable: False for tensors saved with the adapter that never train (frozen initial factors).
    """

    name: str
    shape: tuple[int, ...]
    role: str = "adapter"
    trainable: bool = True


class AdapterDict(nn.ParameterDict):
    """``{adapter name: tensor}`` for one kind of adapter tensor of a LoRA layer.

    The owning layer initialises these tensors (``LoraLayer.reset_parameters``); the no-op ``reset_parameters``
    here tells meta-device materialisers (Lightning's FSDP2 setup, torchtitan) that nothing is left uninitialised.
    """

    def reset_parameters(self) -> None:
        pass


class SharedTensors(nn.Module):
    """``{adapter name: tensor}`` for a tensor that an adapter kind holds once per model for all the adapter's layers,
    so that it exists once in memory and moves with ``.to()`` once.

    Frozen (``trainable=False``, VeRA's random projections): one instance is a child of every layer that uses it, and
    its tensors are non-persistent buffers that state dicts and checkpoints leave out (the kind rebuilds them
    deterministically; adapter files hold them once). Trainable (``trainable=True``, VB-LoRA's vector bank): one
    instance is a child of one module that contains every layer of the adapter (the layers refer to it without owning
    it), and its tensors are parameters: in ``parameters()``, state dicts, checkpoints and files once, under that
    module's key (``vblora_vector_bank.<adapter>``).

    Args:
        trainable: Hold parameters rather than non-persistent buffers.
    """

    trainable: bool = False  # (the class default: holders pickled before trainable ones existed are frozen)

    def __init__(self, trainable: bool = False) -> None:
        super().__init__()
        self.trainable = trainable

    def _tensors(self) -> dict:
        return self._parameters if self.trainable else self._buffers

    def __contains__(self, adapter_name: object) -> bool:
        return adapter_name in self._tensors()

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self._tensors()[adapter_name]

    def __setitem__(self, adapter_name: str, tensor: torch.Tensor) -> None:
        if self.trainable:
            self.register_parameter(adapter_name, nn.Parameter(tensor))
        else:
            self.register_buffer(adapter_name, tensor, persistent=False)

    def __delitem__(self, adapter_name: str) -> None:
        del self._tensors()[adapter_name]

    def __len__(self) -> int:
        return len(self._tensors())

    def keys(self) -> list[str]:
        return list(self._tensors())

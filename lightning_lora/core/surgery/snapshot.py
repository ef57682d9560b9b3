"""One snapshot-and-rollback for everything that adds an adapter (``apply_lora``, ``load_adapter``): taken before the
first change, it puts the model back exactly as it was if anything fails later."""

from __future__ import annotations

from torch import nn

from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import SAVED_WITH
from lightning_lora.core.surgery.removal import drop_unused_shared, remove_adapter_tensors, restore_base_class


class AdapterSnapshot:
    """What adding adapter ``adapter_name`` to ``model`` may change: which parameters train, which modules are saved
    with an adapter (``modules_to_save``, trained biases), which layers already carry adapters.

    Args:
        model: The model about to get the adapter.
        adapter_name: The adapter about to be added.
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        self.model, self.adapter_name = model, adapter_name
        self.flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        self.marks = {module: dict(getattr(module, SAVED_WITH, {})) for module in model.modules()}
        self.adapted_before = {id(layer) for _, layer in lora_layers(model)}

    def new_layers(self) -> list[LoraLayer]:
        """The layers (and parameter sites) that became adapted since the snapshot."""
        return [layer for _, layer in lora_layers(self.model) if id(layer) not in self.adapted_before]

    def restore(self) -> None:
        """Take the adapter off every layer (giving back what its init took from the base weight), turn layers that
        were plain back into their own class, and put marks and trainable flags back."""
        new_layers = self.new_layers()
        for _, layer in lora_layers(self.model):
            if self.adapter_name in layer.lora_settings:
                layer.lora_settings[self.adapter_name].kind.release_base(layer, self.adapter_name)
                remove_adapter_tensors(layer, self.adapter_name)
        for layer in new_layers:
            if not layer.lora_settings:
                restore_base_class(layer)
        drop_unused_shared(self.model)
        for module, marks in self.marks.items():
            if marks:
                module.__dict__[SAVED_WITH] = marks
            else:
                module.__dict__.pop(SAVED_WITH, None)
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)

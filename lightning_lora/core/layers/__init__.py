"""The adapted layer and what it is made of: the layer-type mixins, the kind protocol it calls, the forward-plan slot,
and model-wide queries over adapted layers (which adapters exist, their tensors, a trainable summary).

``lightning_lora.core.layers`` was one module; its names stay importable from here (pickled adapted layers record
``_rebuild_lora_module`` at this path).
"""

from lightning_lora.core.layers.adapted_layer import (  # noqa: F401
    AdapterSettings,
    LoraLayer,
    _rebuild_lora_module,
    lora_class,
    lora_layers,
    restores,
)
from lightning_lora.core.layers.containers import AdapterDict, SharedTensors  # noqa: F401

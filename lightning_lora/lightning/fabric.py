r"""
Lightning Fabric
================

Adapters in a Fabric loop need no callback: the core functions do the work, in this order.

.. code-block:: python

    fabric = L.Fabric(...)                                     # any strategy: one device, DDP, FSDP2 (ModelParallel)
    model = apply_lora(build_model(), config)                  # before setup: the adapters shard with their layers
    model = fabric.setup_module(model)                         # FSDP2 replaces parameters: the optimizer comes after
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(lora_param_groups(model, lr=1e-4)))
    ...
    state = {"model": model, "optimizer": optimizer, "step": step}
    fabric.save(path, state, filter={"model": adapter_checkpoint_filter(model)})   # adapter-only
    fabric.load(path, state, strict=False)                     # the base comes from build_model()
    save_adapter(model, "adapter/")                            # PEFT files (every rank calls it when sharded)

Only the filter is Fabric's own: which state-dict keys an adapter-only checkpoint keeps (the adapters, every other
tensor that trains, base weights a schedule moves), under the wrapper names FSDP and ``torch.compile`` add. Under
``ModelParallelStrategy`` a filtered save needs ``save_distributed_checkpoint=False`` (Fabric's rule).
"""

from __future__ import annotations

from typing import Any, Callable

from lightning.fabric.wrappers import _FabricModule  # what fabric.setup returns; its .module is the user's model
from torch import nn

from lightning_lora.core.common.distributed import clean_name
from lightning_lora.lightning.checkpoint import adapter_checkpoint_keys


def adapter_checkpoint_filter(model: nn.Module) -> Callable[[str, Any], bool]:
    """A ``fabric.save(..., filter={"model": ...})`` filter that keeps what an adapter-only checkpoint holds.

    Args:
        model: The model with adapters (as passed to ``fabric.setup``, or what it returned).

    Example::

        fabric.save("last.ckpt", state, filter={"model": adapter_checkpoint_filter(model)})
    """
    keys = adapter_checkpoint_keys(model.module if isinstance(model, _FabricModule) else model)

    def keep(key: str, value: Any) -> bool:
        return clean_name(key) in keys

    return keep

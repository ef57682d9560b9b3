"""Reading and writing a base layer's weight as a plain dense tensor.

Everything that needs the frozen base weight as numbers (DoRA norms, merging, SVD initialisation) goes through
these two functions, so a new storage format (a quantised weight, say) is taught in this one place.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

# Storage formats other than a plain tensor register a reader and a writer, keyed by parameter type name, e.g.
# bitsandbytes' "Params4bit" (see lightning_lora.core.quantization.quantized_weights), or by layer class name for
# weights that a sharding strategy re-wraps (FSDP2's DTensor of a 4-bit layer's packed bytes).
WeightReader = Callable[[nn.Module], torch.Tensor]
WeightWriter = Callable[[nn.Module, torch.Tensor], None]
_READERS: dict[str, WeightReader] = {}
_WRITERS: dict[str, WeightWriter] = {}


def register_weight_format(param_type_name: str, reader: WeightReader, writer: WeightWriter) -> None:
    """Teach :func:`dense_weight` / :func:`assign_dense_weight` a weight storage format.

    Args:
        param_type_name: ``type(module.weight).__name__`` of the format, e.g. ``"Params4bit"``, or the name of a
            layer class, used when the weight's own type is not registered (a sharded weight).
        reader: Returns the weight as a dense floating tensor in the module's own layout.
        writer: Stores a dense tensor (same layout) back into the module, re-encoding it.
    """
    _READERS[param_type_name] = reader
    _WRITERS[param_type_name] = writer
    _format_of.cache_clear()


def _format_name(module: nn.Module) -> str:
    return _format_of(type(module.weight), type(module))


@functools.lru_cache(maxsize=None)
def _format_of(weight_type: type, module_type: type) -> str:
    # Cached per class pair: DoRA reads its base weight in every forward.
    if weight_type.__name__ in _READERS:
        return weight_type.__name__
    return next((cls.__name__ for cls in module_type.__mro__ if cls.__name__ in _READERS), weight_type.__name__)


def is_plain_weight(module: nn.Module) -> bool:
    """True when ``module.weight`` is an ordinary floating tensor (not quantised)."""
    return _format_name(module) not in _READERS and module.weight.is_floating_point()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a dense floating tensor in its own layout (dequantised if needed; no copy if plain)."""
    reader = _READERS.get(_format_name(module))
    if reader is not None:
        return reader(module)
    if not module.weight.is_floating_point():
        raise TypeError(
            f"{type(module).__name__} has a {module.weight.dtype} weight that lightning_lora cannot read; "
            "register its format with lightning_lora.core.common.base_weights.register_weight_format."
        )
    return module.weight.detach()


@torch.no_grad()
def assign_dense_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Overwrite the module's weight in place with ``value`` (same layout), keeping the Parameter object."""
    writer = _WRITERS.get(_format_name(module))
    if writer is not None:
        writer(module, value)
    else:
        module.weight.copy_(value)

"""Helpers for models that live on several processes: sharded tensors, rank-0 writes, wrapper names.

Pure PyTorch (``torch.distributed``); each function is a no-op on a single process. FSDP2 and tensor parallelism
shard parameters as ``DTensor``; FSDP1 and ``torch.compile`` insert wrapper modules into parameter names; DeepSpeed
ZeRO-3 partitions parameters and gathers them per module in forward.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from lightning_lora.core.inject import adapter_tensor_dicts
from lightning_lora.core.layers import lora_layers

# Name parts that wrappers insert (FSDP1, activation checkpointing, torch.compile); the state dict leaves them out.
WRAPPER_NAME_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def clean_name(name: str) -> str:
    """A parameter or module name without the parts that FSDP1, checkpoint wrappers and ``torch.compile`` add."""
    for part in WRAPPER_NAME_PARTS:
        name = name.replace(part, "")
    return name


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` is gathered (a collective: every rank must call it), others returned as-is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` is already split across processes: DTensor parameters (FSDP2, tensor parallel) or FSDP1
    wrappers. Adapters added after that would not be sharded with the layers they belong to."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(is_dtensor(p) for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def reshard_fsdp2(model: nn.Module) -> None:
    """Put every FSDP2 module back into its sharded state, so in-place weight edits (merging) reach the shards.

    After a forward without backward (validation), FSDP2 may keep the root's parameters unsharded; an edit of those
    unsharded copies would be dropped at the next reshard.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_full_state_dict(state_dict: Mapping[str, torch.Tensor], rank: int = 0) -> dict[str, torch.Tensor]:
    """Full CPU copies of every tensor on ``rank``, an empty dict on the others.

    Sharded tensors are gathered one at a time in key order (every rank must call this with the same keys), so
    peak memory is one full tensor beyond the result.

    Args:
        state_dict: Tensors, sharded (``DTensor``) or not.
        rank: The rank that keeps the result.
    """
    keep = global_rank() == rank
    result: dict[str, torch.Tensor] = {}
    for key in sorted(state_dict):
        value = full_tensor(state_dict[key].detach())
        if keep:
            result[key] = value.to("cpu", copy=True).contiguous()
    return {key: result[key] for key in state_dict} if keep else {}


def adapter_tensors(model: nn.Module) -> Iterable[tuple[nn.Module, nn.Parameter]]:
    """``(LoRA layer, tensor)`` for every adapter tensor of every adapter in ``model``."""
    for _, layer in lora_layers(model):
        for adapter_name in layer.lora_settings:
            for dict_name in adapter_tensor_dicts(layer, adapter_name):
                container = getattr(layer, dict_name, None)
                if container is not None and adapter_name in container:
                    yield layer, container[adapter_name]


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Make DeepSpeed ZeRO-3 gather adapter tensors when their LoRA layer runs.

    ZeRO-3 gathers the parameters of a module just before that module's forward. Adapter tensors live in child
    ``nn.ParameterDict`` containers whose forward never runs, so they are registered as external parameters of the
    LoRA layer that uses them.

    Returns:
        How many tensors were registered.
    """
    from deepspeed.zero import register_external_parameter

    count = 0
    for layer, tensor in adapter_tensors(model):
        register_external_parameter(layer, tensor)
        count += 1
    return count

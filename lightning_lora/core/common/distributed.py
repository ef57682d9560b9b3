"""Helpers for models that live on several processes: sharded tensors, rank-0 writes, wrapper names.

Pure PyTorch (``torch.distributed``); each function is a no-op on a single process. FSDP2 and tensor parallelism
shard parameters as ``DTensor``; FSDP1 and ``torch.compile`` insert wrapper modules into parameter names; DeepSpeed
ZeRO-3 partitions parameters and gathers them per module in forward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

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


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(model)`` wrapped, or ``model`` itself: adapter files and merged exports name tensors
    as the uncompiled model does (no ``_orig_mod.``), so they load into compiled and uncompiled models alike."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


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


# ----- whole weights for initialisers that read them (SVD inits, DoRA norms) -----
def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``, distributing a full ``value`` when ``target`` is a DTensor shard.

    The shards come from group rank 0's ``value`` (``distribute_tensor``'s default), so every rank stores one
    consistent tensor even if the ranks computed ``value`` slightly differently.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(value, DTensor):
        value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
    target.copy_(value)


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside this context the FSDP1 units of ``model`` hold whole parameters, and writes to them persist
    (``summon_full_params(writeback=True)``).

    A no-op for models without ``FullyShardedDataParallel`` units (single device, DDP, FSDP2, DeepSpeed).
    Collective: every rank must enter it.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(model, writeback=True):
        yield


def gathered_parameters(module: nn.Module) -> AbstractContextManager:
    """Context in which DeepSpeed ZeRO-3 partitioned parameters of ``module`` are whole on every rank.

    Changes made on rank 0 are kept (and sent to the other ranks) when the context exits
    (``GatheredParameters(modifier_rank=0)``). A no-op for parameters that DeepSpeed does not partition.
    Collective under ZeRO-3: every rank must enter it.
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def is_materialized(tensor: torch.Tensor) -> bool:
    """False for a tensor on the meta device and for a DeepSpeed ZeRO-3 partition outside a gather context."""
    if tensor.is_meta:
        return False
    return not (hasattr(tensor, "ds_id") and tensor.numel() == 0)

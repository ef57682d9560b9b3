"""Seeing whole tensors when training is sharded or replicated (pure PyTorch, no Lightning).

Initialisers that read the base weight (PiSSA, OLoRA, DoRA norms) need the whole weight, and every process must
end with the same adapter. These helpers hide how each distributed scheme stores a parameter:

- DDP: every rank holds the whole tensor; results agree when every rank computes the same thing (seeded RNG).
- FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``): parameters are ``DTensor`` shards.
  :func:`full_tensor` gathers, :func:`copy_into` writes a whole tensor back as shards (taken from group rank 0).
- FSDP1 (``FullyShardedDataParallel``): :func:`full_parameters` is ``summon_full_params(writeback=True)``.
- DeepSpeed ZeRO-3: :func:`gathered_parameters` is ``deepspeed.zero.GatheredParameters(modifier_rank=0)``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn


def is_rank_zero() -> bool:
    """True on global rank 0, and in a process that is not part of a process group."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` is gathered (a collective: every rank of its mesh must call it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


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
    """Inside this context the FSDP1 units of ``model`` hold whole parameters, and writes to them persist.

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

    Changes made on rank 0 are kept (and sent to the other ranks) when the context exits. A no-op for parameters
    that DeepSpeed does not partition. Collective under ZeRO-3: every rank must enter it.
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

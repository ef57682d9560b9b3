"""DyLoRA's nested ranks (Valipour et al. 2022, https://arxiv.org/abs/2210.07558) on plain LoRA adapters.

A LoRA adapter of rank ``r`` used at rank ``b <= r`` computes with the first ``b`` rows of ``A`` and the first ``b``
columns of ``B``, scaled as a rank-``b`` LoRA with the same alpha: ``alpha / b`` (rsLoRA: ``alpha / sqrt(b)``). That
is the scaling of the authors' code (huawei-noah/Efficient-NLP, ``DyLoRA/loralib``): its ``dynamic`` module
multiplies each truncated factor by ``sqrt(r / b)`` on top of loralib's ``alpha / r``. Training samples ``b`` every
step (:class:`~lightning_lora.lightning.schedules.dylora.DyLoraSchedule`), so the adapter works at every rank;
:func:`set_active_rank` chooses the rank that forward, merge and PEFT export use, :func:`truncate_adapter` keeps
the first ``b`` ranks for good. Works on every layer type (linear, HF Conv1D, embedding, convolution): all keep the
rank in dim 0 of ``A`` and dim 1 of ``B``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import nn

from lightning_lora.core.common.distributed import is_dtensor
from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer, lora_layers

NestedUpdate = Literal["nested", "last"]
NESTED_UPDATES: tuple[str, ...] = ("nested", "last")
# Inits whose factors are zero-delta at every rank: orthogonal init cancels B @ A only over all r ranks, and the
# SVD/LoftQ inits move a rank-r part out of the base weight.
NESTED_INITS: tuple[str, ...] = ("kaiming", "gaussian")


def nested_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, settings: AdapterSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A[:b]`` and ``B[:, :b]`` for ``b = settings.active_rank``; with ``active_rank_update="last"`` the first
    ``b - 1`` ranks are detached, so only the ``b``-th row of ``A`` and column of ``B`` get gradients (the paper's
    "frozen" mode, as the authors' ``dynamic`` module does it).

    Args:
        lora_A: ``[r, in, *kernel]`` factor.
        lora_B: ``[out, r, *ones]`` factor.
        settings: The adapter's settings on the layer (``active_rank`` set).
    """
    b = settings.active_rank
    lora_A, lora_B = lora_A[:b], lora_B[:, :b]
    if settings.active_rank_update == "last" and b > 1:
        lora_A = torch.cat([lora_A[: b - 1].detach(), lora_A[b - 1 :]], dim=0)
        lora_B = torch.cat([lora_B[:, : b - 1].detach(), lora_B[:, b - 1 :]], dim=1)
    return lora_A, lora_B


def nested_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, LoraLayer]]:
    """The layers of ``adapter_name``, checked to take nested ranks.

    Args:
        model: The model holding the adapter.
        adapter_name: Which adapter.

    Raises:
        ValueError: No such adapter; not a plain LoRA adapter (DoRA, LoHa, AdaLoRA, ...); an init other than
            ``"kaiming"``/``"gaussian"``; the adapter is merged into the base weights.
    """
    layers = _adapter_layers(model, adapter_name)
    settings = layers[0][1].lora_settings[adapter_name]
    if not settings.kind.lora_factors:
        raise ValueError(
            f"Nested ranks (DyLoRA) slice the factors of plain LoRA adapters; adapter {adapter_name!r} is a "
            f"{settings.kind.display_name} adapter. Train it with LoraConfig (use_dora=False), or drop DyLoRA."
        )
    if settings.config.init not in NESTED_INITS:
        raise ValueError(
            f"Adapter {adapter_name!r} uses init={settings.config.init!r}, whose starting factors leave the model "
            "unchanged only at the full rank, so lower ranks would change it from the first step. Use "
            "init='kaiming' or init='gaussian' with DyLoRA."
        )
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Adapter {adapter_name!r} is merged into {merged[:3]}; its rank cannot change under a merge (unmerge "
            "would subtract another update). Call unmerge_lora(model) first."
        )
    return layers


def _adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_settings]
    if not layers:
        present = list(dict.fromkeys(a for _, layer in lora_layers(model) for a in layer.lora_settings))
        raise ValueError(
            f"The model has no adapter {adapter_name!r} (it has {present or 'none'}); add a LoRA adapter with "
            "apply_lora(model, LoraConfig(...), adapter_name) first."
        )
    return layers


def nested_rank_limit(model: nn.Module, adapter_name: str = "default") -> int:
    """The largest rank :func:`set_active_rank` accepts: the smallest ``r`` over the adapter's layers.

    Args:
        model: The model holding the adapter.
        adapter_name: Which adapter.

    Raises:
        ValueError: As :func:`nested_layers`.
    """
    return min(layer.lora_settings[adapter_name].r for _, layer in nested_layers(model, adapter_name))


def _check_rank(rank: object, limit: int, adapter_name: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer in 1..{limit} for adapter {adapter_name!r} (its smallest layer rank is "
            f"{limit}), got {rank!r}. Pass a rank in that range, or None for the full rank."
        )


def set_active_rank(
    model: nn.Module, rank: Optional[int], adapter_name: str = "default", *, update: NestedUpdate = "nested"
) -> nn.Module:
    """Compute ``adapter_name`` at rank ``rank`` from now on: forward, merge and PEFT export use the first ``rank``
    ranks with scaling ``alpha / rank`` (see the module docstring). The tensors keep all ``r`` ranks.

    Args:
        model: The model holding the adapter.
        rank: ``1 <= rank <= r``, or None for the full rank (plain LoRA again).
        adapter_name: Which adapter.
        update: Which ranks get gradients: ``"nested"`` all first ``rank``, ``"last"`` only the ``rank``-th.

    Raises:
        ValueError: A rank out of range, an unknown ``update``, or an adapter :func:`nested_layers` refuses.
    """
    if update not in NESTED_UPDATES:
        raise ValueError(f"update must be one of {NESTED_UPDATES}, got {update!r}.")
    layers = nested_layers(model, adapter_name)
    if rank is not None:
        _check_rank(rank, min(layer.lora_settings[adapter_name].r for _, layer in layers), adapter_name)
    for _, layer in layers:
        settings = layer.lora_settings[adapter_name]
        settings.active_rank, settings.active_rank_update = rank, update
    return model


def active_rank(model: nn.Module, adapter_name: str = "default") -> Optional[int]:
    """The rank ``adapter_name`` computes with (None: its full rank).

    Args:
        model: The model holding the adapter.
        adapter_name: Which adapter.
    """
    return _adapter_layers(model, adapter_name)[0][1].lora_settings[adapter_name].active_rank


@torch.no_grad()
def truncate_adapter(model: nn.Module, rank: int, adapter_name: str = "default") -> nn.Module:
    """Keep only the first ``rank`` ranks of ``adapter_name`` for good: a plain rank-``rank`` LoRA adapter whose
    outputs are those of ``set_active_rank(model, rank)``, and that ``save_adapter`` writes as such.

    The factors become new, smaller parameters (an optimizer built before holds the old ones), every layer's ``r``
    becomes ``rank`` and alpha stays (a rank-``b`` LoRA's scaling ``alpha / b`` is the nested scaling); the config
    gets ``r=rank`` and no ``rank_pattern``.

    Args:
        model: The model holding the adapter (whole tensors: gather an FSDP2 model first).
        rank: ``1 <= rank <= r``.
        adapter_name: Which adapter.

    Raises:
        ValueError: As :func:`set_active_rank`, or sharded factors. Nothing changes then.
    """
    layers = nested_layers(model, adapter_name)
    _check_rank(rank, min(layer.lora_settings[adapter_name].r for _, layer in layers), adapter_name)
    if any(is_dtensor(layer.lora_A[adapter_name]) for _, layer in layers):
        raise ValueError(
            "truncate_adapter needs whole factors, and this model's are sharded (FSDP2). Truncate a gathered copy, "
            "or export at the rank with set_active_rank(model, rank) and save_adapter (which gathers)."
        )
    config = dataclasses.replace(layers[0][1].lora_settings[adapter_name].config, r=rank, rank_pattern={})
    for _, layer in layers:
        old_A, old_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        kept_A, kept_B = (t.clone(memory_format=torch.contiguous_format) for t in (old_A[:rank], old_B[:, :rank]))
        layer.lora_A[adapter_name] = nn.Parameter(kept_A, requires_grad=old_A.requires_grad)
        layer.lora_B[adapter_name] = nn.Parameter(kept_B, requires_grad=old_B.requires_grad)
        settings = layer.lora_settings[adapter_name]
        settings.r, settings.config = rank, config
        settings.active_rank, settings.active_rank_update = None, "nested"
    return model

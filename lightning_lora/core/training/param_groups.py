"""Optimizer parameter groups for models with LoRA adapters: LoRA+ learning rates and LoRA-FA.

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) trains ``B`` with a larger learning rate than ``A``
(``lr * loraplus_lr_ratio``); adapters on embeddings get their own learning rate. LoRA-FA (Zhang et al. 2023,
https://arxiv.org/abs/2308.03303) freezes ``A`` at its random init and trains ``B`` only. Both are plain parameter
groups, usable with any ``torch.optim`` optimizer and in any training loop.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.kinds import AdapterTensor
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.layers.adapter_tensors import shared_parameters

# The reference implementation's (and PEFT's) learning rate for embedding adapters under LoRA+.
LORAPLUS_LR_EMBEDDING = 1e-6


def freeze_lora_A(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """LoRA-FA: freeze the ``A`` matrices at their initial values so that only ``B`` trains.

    Embedding adapters are left as they are: their ``A`` starts at zero, so freezing it would freeze the adapter.
    Under DDP or FSDP call this before the model is wrapped (``LoraCallback(lora_fa=True)`` does), because wrappers
    decide at wrap time which parameters get gradients.

    Args:
        model: A model with LoRA adapters.
        adapter_name: The adapter whose ``A`` to freeze; default: every adapter.

    Raises:
        ValueError: The model has no adapter of that name.
    """
    names = adapter_names(model) if adapter_name is None else [adapter_name]
    unknown = [name for name in names if name not in adapter_names(model)]
    if unknown or not names:
        raise ValueError(
            f"The model has no adapter {unknown or adapter_name!r} (it has {adapter_names(model)}); "
            "add one with apply_lora(model, config) first."
        )
    for _, layer, adapter, tensor in _declared_tensors(model):
        if adapter in names and tensor.role == "A":
            getattr(layer, tensor.name)[adapter].requires_grad_(False)
    return model


def lora_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: Optional[float] = None,
    loraplus_lr_embedding: Optional[float] = None,
    weight_decay: float = 0.0,
    lora_fa: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups of every trainable parameter of ``model``, ready for ``torch.optim``.

    Groups (empty ones are left out), each with a ``"name"`` that ``LearningRateMonitor`` shows:

    - ``lora_A``: ``A`` of linear and conv adapters, at ``lr`` with ``weight_decay``.
    - ``lora_B``: ``B`` of linear and conv adapters, at ``lr * loraplus_lr_ratio`` with ``weight_decay``.
    - ``lora_embedding``: ``A`` and ``B`` of embedding adapters, at ``loraplus_lr_embedding`` with ``weight_decay``.
    - ``lora_magnitude``: DoRA magnitudes, at ``lr * loraplus_lr_ratio`` without weight decay.
    - ``adapter``: the tensors of other adapter kinds (LoHa, ...), at ``lr`` with ``weight_decay``.
    - ``decay``: other trainable tensors with 2 or more dimensions (``modules_to_save`` weights), at ``lr`` with
      ``weight_decay``.
    - ``no_decay``: other trainable 1-dim tensors (biases, norms), at ``lr`` without weight decay.

    Without LoRA+ the ratio is 1 and embedding adapters train at ``lr``. Frozen parameters are left out.

    Args:
        model: A model with LoRA adapters (or any module containing one, such as a LightningModule).
        lr: Learning rate of ``A`` and of everything else that is not an adapter ``B``.
        loraplus_lr_ratio: LoRA+: ``B`` matrices and DoRA magnitudes train at ``lr * loraplus_lr_ratio`` (the paper
            suggests 16). None: plain LoRA, one learning rate.
        loraplus_lr_embedding: LoRA+: learning rate of embedding adapters (default ``1e-6``, as the LoRA+ reference
            code and PEFT). Needs ``loraplus_lr_ratio``.
        weight_decay: Weight decay of adapter matrices and other tensors with 2 or more dimensions; biases, norms and
            DoRA magnitudes get none.
        lora_fa: LoRA-FA: freeze the ``A`` matrices first (:func:`freeze_lora_A`, in place) so that only ``B`` trains.

    Raises:
        ValueError: A learning rate or ratio that is not positive, a negative weight decay,
            ``loraplus_lr_embedding`` without ``loraplus_lr_ratio``, or a model with nothing to train.

    Example::

        import torch
        from lightning_lora import LoraConfig, apply_lora, lora_param_groups

        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
        groups = lora_param_groups(model, lr=2e-4, loraplus_lr_ratio=16, weight_decay=0.01)
        optimizer = torch.optim.AdamW(groups)  # B matrices at 3.2e-3, A matrices at 2e-4
    """
    _check_positive("lr", lr)
    check_loraplus_arguments(loraplus_lr_ratio, loraplus_lr_embedding)
    if not (is_finite_number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0 and finite, got {weight_decay!r}.")
    if lora_fa:
        freeze_lora_A(model)

    ratio = 1.0 if loraplus_lr_ratio is None else float(loraplus_lr_ratio)
    embedding_lr = lr if loraplus_lr_ratio is None else (loraplus_lr_embedding or LORAPLUS_LR_EMBEDDING)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_embedding": (embedding_lr, weight_decay),
        "lora_magnitude": (lr * ratio, 0.0),
        "adapter": (lr, weight_decay),
        "decay": (lr, weight_decay),
        "no_decay": (lr, 0.0),
    }
    roles = _adapter_roles(model)
    members: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for parameter in model.parameters():  # shared parameters come once
        if not parameter.requires_grad:
            continue
        role = roles.get(id(parameter)) or ("decay" if parameter.dim() >= 2 else "no_decay")
        members[role].append(parameter)
    if not any(members.values()):
        raise ValueError(
            "The model has no trainable parameters; add an adapter with apply_lora(model, config) first "
            "(it freezes the base model and makes the adapter trainable)."
        )
    return [
        {"name": name, "params": members[name], "lr": group_lr, "weight_decay": group_decay}
        for name, (group_lr, group_decay) in settings.items()
        if members[name]
    ]


def check_loraplus_arguments(loraplus_lr_ratio: Optional[float], loraplus_lr_embedding: Optional[float]) -> None:
    """Raise a ValueError for a LoRA+ ratio or embedding learning rate that :func:`lora_param_groups` refuses."""
    if loraplus_lr_ratio is not None:
        _check_positive("loraplus_lr_ratio", loraplus_lr_ratio)
    if loraplus_lr_embedding is not None:
        _check_positive("loraplus_lr_embedding", loraplus_lr_embedding)
        if loraplus_lr_ratio is None:
            raise ValueError(
                "loraplus_lr_embedding is a LoRA+ setting; set loraplus_lr_ratio too (e.g. 16), or leave both unset."
            )


_GROUP_OF_ROLE = {"A": "lora_A", "B": "lora_B", "embedding": "lora_embedding", "magnitude": "lora_magnitude"}


def _declared_tensors(model: nn.Module) -> Iterator[tuple[str, LoraLayer, str, AdapterTensor]]:
    """``(layer name, layer, adapter name, declaration)`` of every adapter tensor present in ``model``."""
    for layer_name, layer in lora_layers(model):
        for adapter, settings in layer.lora_settings.items():
            for tensor in settings.kind.tensors(layer, settings):
                if adapter in getattr(layer, tensor.name, ()):
                    yield layer_name, layer, adapter, tensor


def _adapter_roles(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> group name`` for every adapter tensor of every adapted layer, from the kinds' roles, and
    for the trainable tensors adapters share between their layers (VB-LoRA's vector bank: ``adapter``)."""
    roles = {id(p): "adapter" for name in adapter_names(model) for _, p in shared_parameters(model, name)}
    roles.update({
        id(getattr(layer, tensor.name)[adapter]): _GROUP_OF_ROLE.get(tensor.role, "adapter")
        for _, layer, adapter, tensor in _declared_tensors(model)
    })
    return roles


def _check_positive(name: str, value: Any) -> None:
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be a number > 0 and finite, got {value!r}.")

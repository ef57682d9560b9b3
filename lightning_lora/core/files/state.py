"""Adapter state dicts: exactly the tensors one adapter trains, with the model's own keys."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lightning_lora.core.common.distributed import copy_into, full_tensor, is_dtensor
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config, saved_module_state
from lightning_lora.core.layers.adapter_tensors import adapter_parameters, shared_adapter_tensors


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as in ``model.state_dict()``.

    Holds the adapter's tensors as its kind declares them (LoRA: ``<layer>.lora_A.<adapter>``,
    ``<layer>.lora_B.<adapter>``; DoRA also ``<layer>.lora_magnitude.<adapter>``), the full state of
    ``modules_to_save`` and the biases trained with the adapter. Values are detached references
    (no copies), like ``state_dict()``.

    Args:
        model: A model with LoRA adapters (or any module containing one, such as a LightningModule).
        adapter_name: Which adapter.

    Raises:
        ValueError: The model has no adapter of that name.
    """
    if adapter_name not in adapter_names(model):
        raise ValueError(
            f"The model has no adapter {adapter_name!r} (it has {adapter_names(model)}); "
            "add one with apply_lora(model, config, adapter_name)."
        )
    state = {key: parameter.detach() for key, parameter in adapter_parameters(model, adapter_name)}
    for key, value in saved_module_state(model, adapter_name):
        state[key] = value.detach()
    return state


def check_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Check that ``state_dict`` has exactly the keys and shapes of the model's adapter; return the targets.

    Raises:
        ValueError: Missing keys, unexpected keys or shape mismatches, listed with the likely fix.
    """
    expected = adapter_state_dict(model, adapter_name)
    problems = key_and_shape_problems(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in state_dict.items()},
        unexpected=[k for k in state_dict if k not in expected],
    )
    if problems:
        raise ValueError(
            f"The adapter state does not fit adapter {adapter_name!r} of this model: " + "; ".join(problems) + ". "
            f"It was made with another {type(get_lora_config(model, adapter_name)).__name__} (kind, r, target_modules, "
            "use_dora, modules_to_save) or another model: "
            "build the model with the config the adapter was trained with."
        )
    return expected


def key_and_shape_problems(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], unexpected: list[str]
) -> list[str]:
    """What is wrong between the shapes a model expects and those a file holds, phrased for an error message.

    Args:
        expected: ``{key: shape}`` the model needs.
        found: ``{key: shape}`` the file holds.
        unexpected: Keys of ``found`` to report as not belonging to the model.
    """
    missing = [k for k in expected if k not in found]
    wrong_shape = [
        f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    return problems


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> nn.Module:
    """Copy an adapter state dict into the model's existing adapter, all or nothing.

    Every key and shape is checked before the first tensor is written, so a bad state dict leaves the model as it
    was. Tensors are copied in place (optimizers keep their references); sharded (DTensor) targets receive their
    shard of a full tensor. The adapter counts as initialised afterwards; for an SVD-initialised adapter the base
    weight becomes the residual of the loaded initial factors (see ``LoraLayer.prepare_load``).

    Args:
        model: The model, with the adapter already added (``apply_lora`` with the same config).
        state_dict: As produced by :func:`adapter_state_dict`.
        adapter_name: The adapter to fill.

    Raises:
        ValueError: See :func:`check_adapter_state_dict`; NaN/Inf values (named); or the adapter is merged into the
            base weights (loading new values would make a later unmerge subtract the wrong delta).
    """
    targets = check_adapter_state_dict(model, state_dict, adapter_name)
    broken = [
        key
        for key, value in state_dict.items()
        if value.is_floating_point()
        and is_plain(value)
        and not (is_plain(targets[key]) and value.data_ptr() == targets[key].data_ptr())  # the model's own tensor
        and not bool(torch.isfinite(value).all())
    ]
    if broken:
        raise ValueError(
            f"The adapter state holds NaN or Inf values in {broken[:3]}{' and more' if len(broken) > 3 else ''}: it "
            "diverged or is damaged. Nothing was loaded; load a healthy state (an earlier checkpoint)."
        )
    merged = [name for name, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Adapter {adapter_name!r} is merged into {merged[:3]}...; call unmerge_lora(model) before loading new "
            "adapter values."
        )
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            layer.prepare_load(state_dict, f"{name}." if name else "", adapter_names=[adapter_name])
    for key, target in targets.items():
        copy_into(target, state_dict[key])
    return model


def is_plain(tensor: torch.Tensor) -> bool:
    """A tensor with local, real data (not meta, not a sharded ``DTensor``)."""
    return not tensor.is_meta and not is_dtensor(tensor)


# PEFT keeps model-level tensors (VeRA's vera_A / vera_B, VB-LoRA's vblora_vector_bank) beside base_model.model
SHARED_PEFT_PREFIX = "base_model."


def shared_file_keys(model: nn.Module, adapter_name: str, peft: bool) -> dict[str, str]:
    """``{file key: container}`` of the tensors ``adapter_name`` holds once for all its layers: ``vera_A`` in our
    files, ``base_model.vera_A`` in PEFT's."""
    prefix = SHARED_PEFT_PREFIX if peft else ""
    return {prefix + container: container for container in shared_adapter_tensors(model, adapter_name)}


def shared_state_for_file(model: nn.Module, adapter_name: str, peft: bool) -> dict[str, torch.Tensor]:
    """The shared tensors a file of ``adapter_name`` holds, keyed for the file; empty when the kind rebuilds them
    from its config instead (VeRA with ``save_projection=False``)."""
    config = get_lora_config(model, adapter_name)
    if not kind_of(config).saves_shared(config):
        return {}
    shared = shared_adapter_tensors(model, adapter_name)
    keys = shared_file_keys(model, adapter_name, peft)
    return {key: full_tensor(shared[container]) for key, container in keys.items()}


def take_shared_state(
    model: nn.Module, adapter_name: str, tensors: Mapping[str, torch.Tensor], peft: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a file's tensors into ``(the rest, {container: shared tensor})``, checking the shared ones' shapes.

    Raises:
        ValueError: A shared tensor whose shape is not the one the model's adapter built.
    """
    keys = shared_file_keys(model, adapter_name, peft)
    model_shared = shared_adapter_tensors(model, adapter_name)
    shared = {keys[key]: value for key, value in tensors.items() if key in keys}
    wrong = [f"{c}: file {tuple(v.shape)} vs model {tuple(model_shared[c].shape)}"
             for c, v in shared.items() if v.shape != model_shared[c].shape]
    if wrong:
        raise ValueError(
            f"The shared tensors do not fit adapter {adapter_name!r}: {'; '.join(wrong)}. The adapter was saved with "
            "other ranks or targets: build it with the config it was trained with."
        )
    return {k: v for k, v in tensors.items() if k not in keys}, shared


@torch.no_grad()
def load_shared_state(model: nn.Module, adapter_name: str, shared: Mapping[str, torch.Tensor]) -> None:
    """Copy checked shared tensors (from :func:`take_shared_state`) into the adapter's."""
    model_shared = shared_adapter_tensors(model, adapter_name)
    for container, value in shared.items():
        model_shared[container].copy_(value)

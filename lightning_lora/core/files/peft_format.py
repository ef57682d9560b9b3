"""The Hugging Face PEFT adapter format: tensor names, and reading PEFT configs and tensors (writing them:
:mod:`lightning_lora.core.files.peft_export`).

A PEFT adapter is ``adapter_config.json`` (``peft_type`` names the kind) plus ``adapter_model.safetensors`` with
keys ``base_model.model.<module>.<leaf>``, where each kind names its leaves (LoRA: ``lora_A.weight`` ``[r, in]``,
``lora_B.weight`` ``[out, r]``, embeddings' ``lora_embedding_A``/``_B``, DoRA's ``lora_magnitude_vector``; LoHa:
``hada_w1_a``, ...), the full state of ``modules_to_save`` modules under their own names and trained biases of
adapted layers as ``.base_layer.bias``. This module holds what is the same for every kind; the kinds
(:mod:`lightning_lora.core.kinds`) hold their names, fields and conversions.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.files.state import SHARED_PEFT_PREFIX
from lightning_lora.core.kinds import KINDS
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import SAVED_WITH, WHOLE_MODULE, saved_module_state
from lightning_lora.core.layers.adapter_tensors import shared_parameters
from lightning_lora.core.targets.targeting import name_matches

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT config fields every kind shares (each kind reads its own: AdapterKind.peft_fields), and fields that carry no
# meaning for the weights.
_TARGETING_FIELDS = {
    "peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
}
_LOW_RANK_FIELDS = {"r", "rank_pattern", "alpha_pattern"}  # with the kind's alpha field (lora_alpha, alpha)
_IGNORED_FIELDS = {
    "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "runtime_config",
}


# ----- names and shapes -----
def join_name(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def peft_tensor_key(layer_name: str, layer: LoraLayer, adapter_name: str, container: str) -> str:
    """PEFT's key for one tensor of an adapter (``lora_A``, ``hada_w1_a``, ...) of the layer ``layer_name``."""
    leaf = layer.lora_settings[adapter_name].kind.peft_tensor_leaf(layer, container)
    return PEFT_PREFIX + join_name(layer.peft_name(layer_name), leaf)


def peft_base_key(model_key: str, lora_layer_names: set[str]) -> str:
    """PEFT's key for a non-adapter tensor saved with an adapter: a wrapped layer's own tensors sit under
    ``base_layer`` (``q_proj.base_layer.bias``), everything else keeps its name."""
    module_name, _, attribute = model_key.rpartition(".")
    if module_name in lora_layer_names:
        return PEFT_PREFIX + join_name(module_name, "base_layer", attribute)
    return PEFT_PREFIX + model_key


def peft_key_map(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{model state-dict key: (PEFT key, PEFT shape)}`` for every tensor of ``adapter_name`` as the model holds it
    (adapter tensors, ``modules_to_save`` state and trained biases)."""
    mapping: dict[str, tuple[str, tuple[int, ...]]] = {}
    layers = lora_layers(model)
    for name, layer in layers:
        if adapter_name not in layer.lora_settings:
            continue
        kind = layer.lora_settings[adapter_name].kind
        for container in peft_tensor_dicts(layer, adapter_name):
            shape = kind.peft_tensor_shape(layer, container, tuple(getattr(layer, container)[adapter_name].shape))
            peft_key = peft_tensor_key(name, layer, adapter_name, container)
            mapping[join_name(name, container, adapter_name)] = (peft_key, shape)
    lora_names = {name for name, _ in layers}
    for key, value in saved_module_state(model, adapter_name):
        mapping[key] = (peft_base_key(key, lora_names), tuple(value.shape))
    for key, value in shared_parameters(model, adapter_name):  # beside base_model.model (VB-LoRA's vector bank)
        mapping[key] = (SHARED_PEFT_PREFIX + key.rsplit(".", 2)[-2], tuple(value.shape))
    return mapping


def peft_tensor_dicts(layer: LoraLayer, adapter_name: str) -> list[str]:
    """The adapter's containers that PEFT stores: the trainable ones (LoRA's frozen initial SVD factors are folded
    into ``lora_A``/``lora_B`` instead)."""
    settings = layer.lora_settings[adapter_name]
    trainable = {t.name for t in settings.kind.tensors(layer, settings) if t.trainable}
    return [c for c in layer.adapter_containers(adapter_name) if c in trainable]


def saved_module_names(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the modules saved whole with ``adapter_name`` (its ``modules_to_save``)."""
    return [n for n, m in model.named_modules() if getattr(m, SAVED_WITH, {}).get(adapter_name) == WHOLE_MODULE]


def base_module_names(model: nn.Module) -> list[str]:
    """Names of the model's modules as PEFT sees the base model: adapter containers inside LoRA layers left out."""
    inside_lora = tuple(f"{name}." for name, _ in lora_layers(model) if name)
    names = (name for name, _ in model.named_modules(remove_duplicate=False))
    return [name for name in names if name and not name.startswith(inside_lora)]


def is_dotted_suffix(name: str, entry: str) -> bool:
    return name_matches(name, [entry])  # PEFT's rule for a target_modules list is ours


def shortest_names(
    selected: list[str], universe: list[str], matches: Callable[[str, str], bool]
) -> Optional[list[str]]:
    """For each selected name its shortest dotted suffix that matches no name outside ``selected``; None when even a
    full name matches another module."""
    wanted, chosen, selects_only_wanted = set(selected), [], {}
    for name in selected:
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):
            candidate = ".".join(parts[start:])
            if candidate not in selects_only_wanted:
                selects_only_wanted[candidate] = all(n in wanted for n in universe if matches(n, candidate))
            if selects_only_wanted[candidate]:
                chosen.append(candidate)
                break
        else:
            return None
    return list(dict.fromkeys(chosen))


# ----- import -----
def lora_config_from_peft(peft_config: Mapping[str, Any], model: nn.Module) -> AdapterConfig:
    """Translate a PEFT ``adapter_config.json`` (as a dict) into the config of the kind its ``peft_type`` names
    (``LORA``: :class:`LoraConfig`, ``LOHA``: ``LoHaConfig``, ...) for ``model``.

    ``modules_to_save`` entries are resolved with PEFT's rule (a module whose name ends with the entry) into full
    module names; entries that match nothing are dropped, as PEFT does (task heads such as ``"score"``).

    Args:
        peft_config: The parsed ``adapter_config.json``.
        model: The model the adapter is for (resolves ``modules_to_save``).

    Raises:
        ValueError: A ``peft_type`` lightning_lora does not read, PEFT options without a lightning_lora equivalent
            (listed by name), or values the kind's config rejects.
    """
    values = dict(peft_config)
    peft_type = str(values.get("peft_type")).upper()
    kinds = {kind.peft_type: kind for kind in KINDS.values()}  # DoRA shares LoRA's type and config class
    if peft_type not in kinds:
        raise ValueError(
            f"This adapter has peft_type={values.get('peft_type')!r}; lightning_lora reads {sorted(kinds)} adapters. "
            "Load it with peft.PeftModel.from_pretrained instead."
        )
    kind = kinds[peft_type]
    low_rank = _LOW_RANK_FIELDS | {kind.peft_alpha_field} if kind.peft_alpha_field is not None else set()
    unsupported = {
        key: value
        for key, value in values.items()
        if key not in _TARGETING_FIELDS | low_rank | kind.peft_fields | _IGNORED_FIELDS
        and value not in (None, False, {}, [], "")
    }
    if unsupported:
        raise ValueError(
            f"PEFT options {unsupported} have no lightning_lora equivalent, so this adapter would load wrongly. "
            "Use an adapter trained without them, or load it with peft.PeftModel.from_pretrained."
        )
    if values.get("target_modules") is None:
        if not values.get("target_parameters"):
            raise ValueError("The PEFT config names no target_modules and no target_parameters: nothing to adapt.")
        values["target_modules"] = []
    layers_pattern = values.get("layers_pattern")
    if isinstance(layers_pattern, (list, tuple)):
        if len(layers_pattern) != 1:
            raise ValueError(f"layers_pattern={layers_pattern!r}: lightning_lora supports one layers_pattern.")
        layers_pattern = layers_pattern[0]
    targeting = {
        "target_modules": values["target_modules"],
        "exclude_modules": values.get("exclude_modules"),
        "layers_to_transform": values.get("layers_to_transform"),
        "layers_pattern": layers_pattern,
        "modules_to_save": _resolve_peft_modules_to_save(values.get("modules_to_save"), model),
    }
    if kind.peft_alpha_field is not None:
        targeting.update(
            r=values.get("r", 8),
            alpha=values.get(kind.peft_alpha_field, 8),
            rank_pattern=dict(values.get("rank_pattern") or {}),
            alpha_pattern=dict(values.get("alpha_pattern") or {}),
        )
    return kind.config_from_peft(values, targeting)


def _resolve_peft_modules_to_save(entries: Optional[list[str]], model: nn.Module) -> Optional[list[str]]:
    if not entries:
        return None
    found = [name for name in base_module_names(model) if any(name.endswith(entry) for entry in entries)]
    return found or None


def adapter_state_from_peft(
    model: nn.Module, adapter_name: str, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rename PEFT-keyed tensors to the model's keys.

    Returns:
        ``(adapter state, base tensors)``: the first keyed like
        :func:`~lightning_lora.core.files.state.adapter_state_dict` (unknown PEFT keys are passed through unchanged so
        the caller's check reports them); the second holds base-model tensors PEFT stores beside some adapters
        (embedding weights saved with ``save_embedding_layers``, buffers caught by ``bias="all"``), keyed like
        ``model.state_dict()``.
    """
    key_map = peft_key_map(model, adapter_name)
    by_peft_key = {peft_key: our_key for our_key, (peft_key, _) in key_map.items()}
    layers = {join_name(name, container, adapter_name): (name, layer, container)
              for name, layer in lora_layers(model) if adapter_name in layer.lora_settings
              for container in layer.adapter_containers(adapter_name)}
    model_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    for peft_key, value in tensors.items():
        our_key = by_peft_key.get(peft_key)
        if our_key is not None:
            ours = model_state.get(our_key)
            if ours is not None and tuple(value.shape) == key_map[our_key][1] != tuple(ours.shape):
                value = value.reshape(ours.shape)  # a layout PEFT keeps differently (conv DoRA magnitudes)
            if our_key in layers:
                name, layer, container = layers[our_key]
                value = layer.lora_settings[adapter_name].kind.peft_import_tensor(
                    layer, adapter_name, name, container, value
                )
            state[our_key] = value
            continue
        model_key = _model_key_of_peft_key(peft_key)
        if model_key is None:
            continue  # PEFT's frozen copy of a modules_to_save module
        if model_key in key_map:
            # A second name for a saved tensor (bias="all" also catches "<module>.modules_to_save.bias").
            if key_map[model_key][0] not in tensors:
                state[model_key] = value
        elif model_key in model_state and tuple(model_state[model_key].shape) == tuple(value.shape):
            base[model_key] = value
        else:
            state[peft_key] = value
    return state, base


def _model_key_of_peft_key(peft_key: str) -> Optional[str]:
    parts = peft_key.removeprefix(PEFT_PREFIX).split(".")
    if "original_module" in parts:
        return None
    return ".".join(part for part in parts if part not in ("base_layer", "modules_to_save"))

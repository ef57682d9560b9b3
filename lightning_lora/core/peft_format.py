"""The Hugging Face PEFT adapter format: config and tensor names to and from PEFT, and a vLLM-ready variant.

A PEFT adapter is ``adapter_config.json`` (``peft_type`` names the kind) plus ``adapter_model.safetensors`` with
keys ``base_model.model.<module>.<leaf>``, where each kind names its leaves (LoRA: ``lora_A.weight`` ``[r, in]``,
``lora_B.weight`` ``[out, r]``, embeddings' ``lora_embedding_A``/``_B``, DoRA's ``lora_magnitude_vector``; LoHa:
``hada_w1_a``, ...), the full state of ``modules_to_save`` modules under their own names and trained biases of
adapted layers as ``.base_layer.bias``. This module holds what is the same for every kind; the kinds
(:mod:`lightning_lora.core.kinds`) hold their names, fields and conversions.

PEFT loads adapters with ``strict=False``, so a wrong name would be dropped silently. The exporter therefore reads
its own config back with the import rules and checks that it selects exactly the adapted layers, with the same
ranks and scalings, before anything is written.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_lora.core.config import AdapterConfig, pattern_matches
from lightning_lora.core.distributed import full_tensor
from lightning_lora.core.inject import SAVED_WITH, WHOLE_MODULE, adapter_names, get_lora_config, saved_module_state
from lightning_lora.core.kinds import KINDS, kind_of
from lightning_lora.core.kinds.trainable_tokens import find_token_layers, token_layer
from lightning_lora.core.layers import AdapterDict, AdapterSettings, LoraLayer, TransposedLinearAdapters, lora_layers
from lightning_lora.core.parameter_adapters import (
    ParameterAdapters,
    base_modules,
    find_parameter_targets,
    site_name,
    whole_module_sites,
)
from lightning_lora.core.state import shared_state_for_file
from lightning_lora.core.targeting import find_modules_to_save, find_targets, name_matches

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
def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def peft_tensor_key(layer_name: str, layer: LoraLayer, adapter_name: str, container: str) -> str:
    """PEFT's key for one tensor of an adapter (``lora_A``, ``hada_w1_a``, ...) of the layer ``layer_name``."""
    leaf = layer.lora_settings[adapter_name].kind.peft_tensor_leaf(layer, container)
    return PEFT_PREFIX + _join(layer.peft_name(layer_name), leaf)


def peft_base_key(model_key: str, lora_layer_names: set[str]) -> str:
    """PEFT's key for a non-adapter tensor saved with an adapter: a wrapped layer's own tensors sit under
    ``base_layer`` (``q_proj.base_layer.bias``), everything else keeps its name."""
    module_name, _, attribute = model_key.rpartition(".")
    if module_name in lora_layer_names:
        return PEFT_PREFIX + _join(module_name, "base_layer", attribute)
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
            mapping[_join(name, container, adapter_name)] = (peft_key, shape)
    lora_names = {name for name, _ in layers}
    for key, value in saved_module_state(model, adapter_name):
        mapping[key] = (peft_base_key(key, lora_names), tuple(value.shape))
    return mapping


def peft_tensor_dicts(layer: LoraLayer, adapter_name: str) -> list[str]:
    """The adapter's containers that PEFT stores: the trainable ones (LoRA's frozen initial SVD factors are folded
    into ``lora_A``/``lora_B`` instead)."""
    settings = layer.lora_settings[adapter_name]
    trainable = {t.name for t in settings.kind.tensors(layer, settings) if t.trainable}
    return [c for c in layer.adapter_containers(adapter_name) if c in trainable]


# ----- export -----
class _ExportedLayer:
    """One adapted layer as it will be written: the kind's tensors, rank and alpha after its conversions (LoRA's
    SVD-init conversion) and, for vLLM, the global rank and scaling."""

    def __init__(self, name: str, layer: LoraLayer, adapter_name: str) -> None:
        settings = layer.lora_settings[adapter_name]
        self.name, self.layer, self.kind, self.scaling = name, layer, settings.kind, settings.scaling
        self.tensors, self.r, self.alpha = settings.kind.peft_export(layer, adapter_name)


def peft_adapter_state(
    model: nn.Module, adapter_name: str = "default", *, vllm: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One adapter in PEFT's format: the ``adapter_config.json`` content and the tensors of
    ``adapter_model.safetensors``, checked against the model.

    Names are relative to ``model``: pass the module PEFT would wrap (for a LightningModule holding a Hugging Face
    model as ``self.model``, pass ``module.model``). SVD-initialised LoRA adapters (PiSSA, OLoRA, MiLoRA) become
    plain LoRA deltas against the original base weights (``A' = [A; A0]``, ``B' = [B, -B0]``, rank doubled, same
    scaling); ``init_lora_weights`` is always ``true`` so PEFT does not re-run an SVD at load.

    Args:
        model: The model holding the adapter.
        adapter_name: Which adapter.
        vllm: Write what vLLM reads (LoRA only): one global rank and scaling (per-layer scalings folded into B,
            smaller ranks zero-padded, both exact), only ``lora_A``/``lora_B`` tensors.

    Raises:
        ValueError: Unknown adapter; an adapter the kind cannot express in PEFT's format (DoRA with an SVD init, an
            init that rewrote the base weights without keeping its factors, trained biases on a kind whose PEFT
            config has no ``bias``); for ``vllm``: another kind than plain LoRA, ``modules_to_save`` or trained
            biases; names PEFT could not select unambiguously.
    """
    if adapter_name not in adapter_names(model):
        raise ValueError(
            f"The model has no adapter {adapter_name!r} (it has {adapter_names(model)}); "
            "add one with apply_lora(model, config, adapter_name)."
        )
    config = get_lora_config(model, adapter_name)
    kind = kind_of(config)
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_settings]
    kind.check_peft_export(adapter_name, config, [(n, lay) for n, lay in layers if not token_layer(lay, adapter_name)])
    _check_exportable(adapter_name, config, vllm)
    exported = [_ExportedLayer(name, layer, adapter_name) for name, layer in layers]
    if vllm:
        rank = max(e.r for e in exported)
        scaling = Counter(e.scaling for e in exported).most_common(1)[0][0]
        for entry in exported:
            entry.tensors = entry.kind.fold_for_vllm(entry.tensors, entry.r, entry.scaling, rank, scaling)
            entry.r, entry.alpha, entry.scaling = rank, scaling * rank, scaling

    peft_config = _peft_config(model, config, exported, adapter_name, vllm)
    key_map = peft_key_map(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    for entry in exported:
        for container, value in entry.tensors.items():
            peft_key, peft_shape = key_map[_join(entry.name, container, adapter_name)]
            tensors[peft_key] = value.reshape(peft_shape) if value.dim() != len(peft_shape) else value
    for key, value in saved_module_state(model, adapter_name):
        tensors[key_map[key][0]] = full_tensor(value.detach())
    tensors.update(shared_state_for_file(model, adapter_name, peft=True))
    _check_export(model, adapter_name, peft_config, exported, tensors)
    return peft_config, tensors


def _check_exportable(adapter_name: str, config: AdapterConfig, vllm: bool) -> None:
    kind = kind_of(config)
    if config.bias != "none" and "bias" not in kind.peft_fields:
        raise ValueError(
            f"Adapter {adapter_name!r} trains biases (bias={config.bias!r}), which PEFT's {kind.peft_type} config "
            "cannot express. Save it with format='lightning_lora', or train with bias='none'."
        )
    if not vllm:
        return
    problems = []
    if not kind.vllm_servable:
        problems.append(f"a {kind.display_name} adapter (vLLM serves plain LoRA)")
    if config.modules_to_save:
        problems.append(f"modules_to_save={config.modules_to_save}")
    if config.bias != "none":
        problems.append(f"trained biases (bias={config.bias!r})")
    if problems:
        raise ValueError(
            f"A vLLM adapter holds only lora_A/lora_B tensors under one scaling; adapter {adapter_name!r} is or has "
            + " and ".join(problems)
            + ". Train without them for vLLM, export with format='peft', or serve the merged model "
            "(save_merged_model)."
        )


def _peft_config(
    model: nn.Module, config: AdapterConfig, exported: list[_ExportedLayer], adapter_name: str, vllm: bool
) -> dict[str, Any]:
    kind = kind_of(config)
    token_entries = [e for e in exported if token_layer(e.layer, adapter_name)]
    exported = [e for e in exported if e not in token_entries]
    token_rows = {e.name: list(settings.token_indices) for e in token_entries  # tied heads follow, as in PEFT
                  if (settings := e.layer.lora_settings[adapter_name]).token_source is None}  # fmt: skip
    sites = [e for e in exported if isinstance(e.layer, ParameterAdapters)]
    parameter_sites = [e for e in sites if e.layer.peft_path is None]  # target_parameters
    # A module PEFT adapts as a whole through its parameters (nn.MultiheadAttention) is named by its owner.
    names = [e.name for e in exported if e not in sites]
    names += list(dict.fromkeys(e.layer.owner_name(e.name) for e in sites if e not in parameter_sites))
    universe = base_module_names(model)
    targets = _shortest_names(names, universe, _is_dotted_suffix)
    saved_modules = saved_module_names(model, adapter_name)
    modules_to_save = _shortest_names(saved_modules, universe, str.endswith) if saved_modules else None
    if targets is None or (saved_modules and modules_to_save is None):
        raise ValueError(
            f"The layers of adapter {adapter_name!r} cannot be named unambiguously with PEFT's matching rules (a "
            "module's full name is the suffix of another's); export with format='lightning_lora'."
        )
    fields = kind.peft_config_fields(config)
    fields.update(kind.peft_layer_fields(adapter_name, config, [(entry.name, entry.layer) for entry in exported]))
    if kind.peft_alpha_field is not None:  # rank-r kinds: the most common r and alpha, the rest as patterns
        counts = Counter((e.r, e.alpha) for e in exported)
        rank, alpha = max(counts, key=lambda pair: (counts[pair], pair == (config.r, config.alpha)))
        fields.update({
            "r": rank,
            kind.peft_alpha_field: _plain_number(alpha),
            "rank_pattern": _patterns({e.name: e.r for e in exported}, rank),
            "alpha_pattern": _patterns({e.name: _plain_number(e.alpha) for e in exported}, _plain_number(alpha)),
        })
    if vllm:
        fields.update(use_rslora=False, bias="none")
    if token_rows:
        fields["trainable_token_indices"] = token_rows
    if parameter_sites:
        keys = [e.layer.weight_key(e.name) for e in parameter_sites]
        everything = [f"{module}.{p}" if module else p for module, m in base_modules(model)
                      for p, _ in m.named_parameters(recurse=False)]
        fields["target_parameters"] = _shortest_names(keys, everything, _is_dotted_suffix) or keys
    if "fan_in_fan_out" in kind.peft_fields:
        fields["fan_in_fan_out"] = any(isinstance(entry.layer, TransposedLinearAdapters) for entry in exported)
    return {
        "peft_type": kind.peft_type,
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "target_modules": targets,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": modules_to_save,
        **fields,
        "inference_mode": True,
    }


def saved_module_names(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the modules saved whole with ``adapter_name`` (its ``modules_to_save``)."""
    return [n for n, m in model.named_modules() if getattr(m, SAVED_WITH, {}).get(adapter_name) == WHOLE_MODULE]


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def base_module_names(model: nn.Module) -> list[str]:
    """Names of the model's modules as PEFT sees the base model: adapter containers inside LoRA layers left out."""
    inside_lora = tuple(f"{name}." for name, _ in lora_layers(model) if name)
    names = (name for name, _ in model.named_modules(remove_duplicate=False))
    return [name for name in names if name and not name.startswith(inside_lora)]


def _is_dotted_suffix(name: str, entry: str) -> bool:
    return name_matches(name, [entry])  # PEFT's rule for a target_modules list is ours


def _shortest_names(
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


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` entries giving each layer its value where it differs from
    ``default``; keys are short suffixes where they are unambiguous, escaped full names otherwise."""
    names = list(values)
    patterns: dict[str, float] = {}
    for value in dict.fromkeys(v for v in values.values() if v != default):
        group = [n for n in names if values[n] == value]
        keys = _shortest_names(group, names, pattern_matches) or [re.escape(n) for n in group]
        patterns.update(dict.fromkeys(keys, value))
    return patterns


def _check_export(
    model: nn.Module,
    adapter_name: str,
    peft_config: dict[str, Any],
    exported: list[_ExportedLayer],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Read the written config back with the import rules: it must select exactly the adapted layers with their
    ranks and scalings, the saved modules, and tensors of the shapes PEFT will build."""
    parsed = lora_config_from_peft(peft_config, model)
    token_rows = {e.name: e.layer.lora_settings[adapter_name].token_indices
                  for e in exported if token_layer(e.layer, adapter_name)}  # fmt: skip
    by_name = {entry.name: entry for entry in exported if entry.name not in token_rows}
    selected = []
    for name, module in find_targets(model, parsed):
        sites = whole_module_sites(name, module, parsed)
        selected += [site_name(name, path) for path, _ in sites] if sites else [name]
    selected += [site_name(owner, parameter) for owner, _, parameter in find_parameter_targets(model, parsed)]
    problems = []
    read_rows = {name: indices for name, _, indices, _ in find_token_layers(model, parsed)}
    if read_rows != token_rows:
        problems.append(f"trainable_token_indices reads back as {read_rows}, not {token_rows}")
    if set(selected) != set(by_name):
        problems.append(
            f"the config selects {sorted(set(selected) ^ set(by_name))[:4]} differently from the adapter"
        )
    for name in set(selected) & set(by_name):
        entry = by_name[name]
        read_back = AdapterSettings(parsed.rank_for(name), parsed.alpha_for(name), 0.0, kind_of(parsed), parsed)
        if (read_back.kind.name, read_back.r) != (entry.kind.name, entry.r) or not math.isclose(
            read_back.scaling, entry.scaling, rel_tol=1e-6
        ):
            same_kind = read_back.kind.name == entry.kind.name
            kinds = "" if same_kind else f" for {read_back.kind.name}, not {entry.kind.name}"
            problems.append(
                f"{name}: config gives r={read_back.r}, scaling={read_back.scaling:g}{kinds}; tensors have r={entry.r}"
            )
            continue
        shapes = read_back.kind.peft_file_shapes(entry.layer, read_back, name, peft_config)
        written = {container: tuple(value.shape) for container, value in entry.tensors.items()}
        if written != shapes:
            problems.append(f"{name}: tensors {written} for r={read_back.r}")
    saved = set(saved_module_names(model, adapter_name))
    if set(find_modules_to_save(model, parsed)) != saved:
        problems.append(f"modules_to_save {peft_config['modules_to_save']} does not select {sorted(saved)}")
    not_finite = [key for key, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
    if not_finite:
        problems.append(f"non-finite values in {not_finite[:3]} (diverged training?)")
    if problems:
        raise ValueError(
            f"Refusing to write a PEFT adapter that PEFT would load wrongly: {'; '.join(problems)}. Save with "
            "format='lightning_lora' instead, and please report this."
        )


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
        ``(adapter state, base tensors)``: the first keyed like :func:`~lightning_lora.core.state.adapter_state_dict`
        (unknown PEFT keys are passed through unchanged so the caller's check reports them); the second holds
        base-model tensors PEFT stores beside some adapters (embedding weights saved with ``save_embedding_layers``,
        buffers caught by ``bias="all"``), keyed like ``model.state_dict()``.
    """
    key_map = peft_key_map(model, adapter_name)
    by_peft_key = {peft_key: our_key for our_key, (peft_key, _) in key_map.items()}
    layers = {_join(name, container, adapter_name): (name, layer, container)
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

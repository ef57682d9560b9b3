"""Writing an adapter in Hugging Face PEFT's format (and the vLLM-ready variant): the config and the tensors.

PEFT loads adapters with ``strict=False``, so a wrong name would be dropped silently. The exporter therefore reads
its own config back with the import rules (:mod:`lightning_lora.core.files.peft_format`) and checks that it selects
exactly the adapted layers, with the same ranks and scalings, before anything is written.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from lightning_lora.core.common.distributed import full_tensor, uncompiled
from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.config.fields import pattern_matches
from lightning_lora.core.files.peft_format import (
    base_module_names,
    is_dotted_suffix,
    join_name,
    lora_config_from_peft,
    peft_key_map,
    saved_module_names,
    shortest_names,
)
from lightning_lora.core.files.state import shared_state_for_file
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.kinds.trainable_tokens import find_token_layers, token_layer
from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config, saved_module_state
from lightning_lora.core.layers.adapter_tensors import shared_parameters
from lightning_lora.core.layers.layer_types import TransposedLinearAdapters
from lightning_lora.core.layers.parameter_adapters import (
    ParameterAdapters,
    base_modules,
    find_parameter_targets,
    site_name,
    whole_module_sites,
)
from lightning_lora.core.targets.targeting import find_modules_to_save, find_targets


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
    model = uncompiled(model)
    if adapter_name not in adapter_names(model):
        raise ValueError(
            f"The model has no adapter {adapter_name!r} (it has {adapter_names(model)}); "
            "add one with apply_lora(model, config, adapter_name)."
        )
    config = get_lora_config(model, adapter_name)
    kind = kind_of(config)
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_settings]
    kind.check_peft_export(adapter_name, config, [(n, lay) for n, lay in layers if not token_layer(lay, adapter_name)])
    check_exportable(adapter_name, config, vllm)
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
            peft_key, peft_shape = key_map[join_name(entry.name, container, adapter_name)]
            tensors[peft_key] = value.reshape(peft_shape) if value.dim() != len(peft_shape) else value
    for key, value in [*saved_module_state(model, adapter_name), *shared_parameters(model, adapter_name)]:
        tensors[key_map[key][0]] = full_tensor(value.detach())
    tensors.update(shared_state_for_file(model, adapter_name, peft=True))
    _check_export(model, adapter_name, peft_config, exported, tensors)
    return peft_config, kind.peft_save_tensors(config, tensors)


def check_exportable(adapter_name: str, config: AdapterConfig, vllm: bool) -> None:
    """Raise a ValueError naming the fix when the PEFT (``vllm=False``) or vLLM format cannot hold an adapter with
    ``config``, whatever its trained values: trained biases where the kind's PEFT config has no ``bias``; for vLLM,
    another kind than plain LoRA, ``modules_to_save`` or trained biases."""
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
    targets = shortest_names(names, universe, is_dotted_suffix)
    saved_modules = saved_module_names(model, adapter_name)
    modules_to_save = shortest_names(saved_modules, universe, str.endswith) if saved_modules else None
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
        fields["target_parameters"] = shortest_names(keys, everything, is_dotted_suffix) or keys
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




def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)








def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` entries giving each layer its value where it differs from
    ``default``; keys are short suffixes where they are unambiguous, escaped full names otherwise."""
    names = list(values)
    patterns: dict[str, float] = {}
    for value in dict.fromkeys(v for v in values.values() if v != default):
        group = [n for n in names if values[n] == value]
        keys = shortest_names(group, names, pattern_matches) or [re.escape(n) for n in group]
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
            same_kind = read_back.kind is entry.kind
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

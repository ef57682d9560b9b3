"""The Hugging Face PEFT adapter format: config and tensor names to and from PEFT, and a vLLM-ready variant.

A PEFT adapter is ``adapter_config.json`` plus ``adapter_model.safetensors`` with keys such as
``base_model.model.<module>.lora_A.weight`` (``[r, in]``), ``.lora_B.weight`` (``[out, r]``), embeddings'
``.lora_embedding_A`` / ``.lora_embedding_B``, DoRA's ``.lora_magnitude_vector``, the full state of
``modules_to_save`` modules under their own names and trained biases of adapted layers as ``.base_layer.bias``.

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

from lightning_lora.core.config import LoraConfig, pattern_matches
from lightning_lora.core.distributed import full_tensor
from lightning_lora.core.initializers import check_init_name, weight_dependent_init
from lightning_lora.core.inject import (
    SAVED_WITH,
    WHOLE_MODULE,
    adapter_names,
    adapter_tensor_dicts,
    get_lora_config,
    saved_module_state,
)
from lightning_lora.core.layers import (
    INIT_FACTOR_DICTS,
    ConvAdapters,
    EmbeddingAdapters,
    LoraLayer,
    TransposedLinearAdapters,
    lora_layers,
)
from lightning_lora.core.targeting import find_modules_to_save, find_targets, name_matches

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT config fields this module translates, and fields that carry no meaning for the weights.
_TRANSLATED_FIELDS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "modules_to_save", "use_rslora", "use_dora",
    "init_lora_weights",
}
_IGNORED_FIELDS = {
    "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "runtime_config",
}


# ----- names and shapes -----
def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def peft_tensor_key(layer_name: str, layer: LoraLayer, dict_name: str) -> str:
    """PEFT's key for one adapter tensor (``lora_A``, ``lora_B`` or ``lora_magnitude``) of the layer ``layer_name``."""
    if dict_name == "lora_magnitude":
        leaf = "lora_magnitude_vector"
    elif isinstance(layer, EmbeddingAdapters):
        leaf = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}[dict_name]
    else:
        leaf = f"{dict_name}.weight"
    return PEFT_PREFIX + _join(layer_name, leaf)


def peft_base_key(model_key: str, lora_layer_names: set[str]) -> str:
    """PEFT's key for a non-adapter tensor saved with an adapter: a wrapped layer's own tensors sit under
    ``base_layer`` (``q_proj.base_layer.bias``), everything else keeps its name."""
    module_name, _, attribute = model_key.rpartition(".")
    if module_name in lora_layer_names:
        return PEFT_PREFIX + _join(module_name, "base_layer", attribute)
    return PEFT_PREFIX + model_key


def _magnitude_shape(layer: LoraLayer, out_features: int) -> tuple[int, ...]:
    # PEFT keeps conv DoRA magnitudes as [1, out, 1, ...] (the layout of its norm), all others as [out].
    if isinstance(layer, ConvAdapters):
        return (1, out_features, *(1 for _ in layer.kernel_size))
    return (out_features,)


def peft_key_map(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{model state-dict key: (PEFT key, PEFT shape)}`` for every tensor of ``adapter_name`` as the model holds it
    (adapter tensors, ``modules_to_save`` state and trained biases)."""
    mapping: dict[str, tuple[str, tuple[int, ...]]] = {}
    layers = lora_layers(model)
    for name, layer in layers:
        if adapter_name not in layer.lora_settings:
            continue
        for dict_name in peft_tensor_dicts(layer, adapter_name):
            tensor = getattr(layer, dict_name)[adapter_name]
            shape = _magnitude_shape(layer, tensor.shape[0]) if dict_name == "lora_magnitude" else tuple(tensor.shape)
            mapping[_join(name, dict_name, adapter_name)] = (peft_tensor_key(name, layer, dict_name), shape)
    lora_names = {name for name, _ in layers}
    for key, value in saved_module_state(model, adapter_name):
        mapping[key] = (peft_base_key(key, lora_names), tuple(value.shape))
    return mapping


def peft_tensor_dicts(layer: LoraLayer, adapter_name: str) -> list[str]:
    """The adapter's tensor dicts that PEFT stores; initial SVD factors are folded into ``lora_A``/``lora_B``."""
    return [d for d in adapter_tensor_dicts(layer, adapter_name) if d not in INIT_FACTOR_DICTS]


def svd_init_factors(layer: LoraLayer, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(A0 [r, in], B0 [out, r])`` of an adapter whose SVD init (PiSSA, OLoRA, MiLoRA) moved ``scaling * B0 @ A0``
    out of the base weight, or None. Such layers keep them in ``layer.lora_init_A`` / ``layer.lora_init_B``."""
    init_A, init_B = getattr(layer, "lora_init_A", None), getattr(layer, "lora_init_B", None)
    if init_A is None or init_B is None or adapter_name not in init_A:
        return None
    return init_A[adapter_name], init_B[adapter_name]


# ----- export -----
class _ExportedLayer:
    """One adapted layer as it will be written: rank, alpha and factors after SVD-init conversion and vLLM folding."""

    def __init__(self, name: str, layer: LoraLayer, adapter_name: str) -> None:
        settings = layer.lora_settings[adapter_name]
        self.name, self.layer, self.scaling = name, layer, settings.scaling
        self.A = full_tensor(layer.lora_A[adapter_name].detach())
        self.B = full_tensor(layer.lora_B[adapter_name].detach())
        self.r, self.alpha = settings.r, settings.alpha
        factors = svd_init_factors(layer, adapter_name)
        if factors is not None:
            # W_orig = W_res + s B0 A0, so W_res + s B A = W_orig + s [B, -B0] [A; A0]: a plain LoRA of rank 2r with
            # the same scaling (alpha doubled, or times sqrt(2) under rsLoRA's alpha / sqrt(r)).
            A0, B0 = (full_tensor(t.detach()) for t in factors)
            self.A = torch.cat([self.A, A0.to(self.A.dtype)], dim=0)
            self.B = torch.cat([self.B, -B0.to(self.B.dtype)], dim=1)
            self.r *= 2
            self.alpha *= math.sqrt(2) if settings.use_rslora else 2.0

    def fold_for_vllm(self, rank: int, scaling: float) -> None:
        """Give this layer the global ``rank`` (zero padding, exact) and ``scaling`` (folded into B)."""
        if self.scaling != scaling:
            self.B = self.B * (self.scaling / scaling)
        pad = rank - self.r
        if pad:
            self.A = torch.cat([self.A, self.A.new_zeros(pad, *self.A.shape[1:])], dim=0)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], pad, *self.B.shape[2:])], dim=1)
        self.r, self.alpha, self.scaling = rank, scaling * rank, scaling


def peft_adapter_state(
    model: nn.Module, adapter_name: str = "default", *, vllm: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One adapter in PEFT's format: the ``adapter_config.json`` content and the tensors of
    ``adapter_model.safetensors``, checked against the model.

    Names are relative to ``model``: pass the module PEFT would wrap (for a LightningModule holding a Hugging Face
    model as ``self.model``, pass ``module.model``). SVD-initialised adapters (PiSSA, OLoRA, MiLoRA) become plain
    LoRA deltas against the original base weights (``A' = [A; A0]``, ``B' = [B, -B0]``, rank doubled, same scaling).
    ``init_lora_weights`` is always ``true`` so PEFT does not re-run an SVD at load.

    Args:
        model: The model holding the adapter.
        adapter_name: Which adapter.
        vllm: Write what vLLM reads: one global rank and scaling (per-layer scalings folded into B, smaller ranks
            zero-padded, both exact), only ``lora_A``/``lora_B`` tensors.

    Raises:
        ValueError: Unknown adapter; DoRA combined with an SVD init (not expressible as a LoRA delta); an adapter
            whose init rewrote the base weights without keeping its initial factors; for ``vllm``: DoRA,
            ``modules_to_save`` or trained biases; names PEFT could not select unambiguously.
    """
    if adapter_name not in adapter_names(model):
        raise ValueError(
            f"The model has no adapter {adapter_name!r} (it has {adapter_names(model)}); "
            "add one with apply_lora(model, config, adapter_name)."
        )
    config = get_lora_config(model, adapter_name)
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_settings]
    _check_exportable(adapter_name, config, layers, vllm)
    exported = [_ExportedLayer(name, layer, adapter_name) for name, layer in layers]
    if vllm:
        rank = max(e.r for e in exported)
        scaling = Counter(e.scaling for e in exported).most_common(1)[0][0]
        for entry in exported:
            entry.fold_for_vllm(rank, scaling)

    peft_config = _peft_config(model, config, exported, adapter_name, vllm)
    key_map = peft_key_map(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    for entry in exported:
        for dict_name in peft_tensor_dicts(entry.layer, adapter_name):
            peft_key, peft_shape = key_map[_join(entry.name, dict_name, adapter_name)]
            value = {"lora_A": entry.A, "lora_B": entry.B}.get(dict_name)
            if value is None:  # DoRA magnitude: unchanged by the conversions above
                value = full_tensor(getattr(entry.layer, dict_name)[adapter_name].detach()).reshape(peft_shape)
            tensors[peft_key] = value
    for key, value in saved_module_state(model, adapter_name):
        tensors[key_map[key][0]] = full_tensor(value.detach())
    _check_export(model, adapter_name, peft_config, exported, tensors)
    return peft_config, tensors


def _check_exportable(
    adapter_name: str,
    config: LoraConfig,
    layers: list[tuple[str, LoraLayer]],
    vllm: bool,
) -> None:
    converted = [name for name, layer in layers if svd_init_factors(layer, adapter_name) is not None]
    if config.use_dora and converted:
        raise ValueError(
            f"Adapter {adapter_name!r} combines DoRA with init={config.init!r}: its base weights hold a residual and "
            "a DoRA adapter cannot be re-expressed against the original weights. Save it with "
            "format='lightning_lora', or export the merged model with save_merged_model."
        )
    missing = [name for name, layer in layers if name not in converted]
    if weight_dependent_init(config.init) and missing:
        raise ValueError(
            f"Adapter {adapter_name!r} was initialised with init={config.init!r}, which rewrote the base weights, but "
            f"{missing[:3]} keep no initial factors (layer.lora_init_A / lora_init_B), so no exact delta against the "
            "original weights exists. Save it with format='lightning_lora', or export the merged model."
        )
    if not vllm:
        return
    problems = []
    if config.use_dora:
        problems.append("DoRA (use_dora=True)")
    if config.modules_to_save:
        problems.append(f"modules_to_save={config.modules_to_save}")
    if config.bias != "none":
        problems.append(f"trained biases (bias={config.bias!r})")
    if problems:
        raise ValueError(
            f"A vLLM adapter holds only lora_A/lora_B tensors under one scaling; adapter {adapter_name!r} also has "
            + " and ".join(problems)
            + ". Train without them for vLLM, export with format='peft', or serve the merged model "
            "(save_merged_model)."
        )


def _peft_config(
    model: nn.Module, config: LoraConfig, exported: list[_ExportedLayer], adapter_name: str, vllm: bool
) -> dict[str, Any]:
    names = [entry.name for entry in exported]
    universe = base_module_names(model)
    targets = _shortest_names(names, universe, _is_dotted_suffix)
    counts = Counter((e.r, e.alpha) for e in exported)
    rank, alpha = max(counts, key=lambda pair: (counts[pair], pair == (config.r, config.alpha)))
    saved_modules = saved_module_names(model, adapter_name)
    modules_to_save = _shortest_names(saved_modules, universe, str.endswith) if saved_modules else None
    if targets is None or (saved_modules and modules_to_save is None):
        raise ValueError(
            f"The layers of adapter {adapter_name!r} cannot be named unambiguously with PEFT's matching rules (a "
            "module's full name is the suffix of another's); export with format='lightning_lora'."
        )
    is_conv1d = [isinstance(entry.layer, TransposedLinearAdapters) for entry in exported]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": rank,
        "lora_alpha": _plain_number(alpha),
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "exclude_modules": None,
        "rank_pattern": _patterns({e.name: e.r for e in exported}, rank),
        "alpha_pattern": _patterns({e.name: _plain_number(e.alpha) for e in exported}, _plain_number(alpha)),
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none" if vllm else config.bias,
        "modules_to_save": modules_to_save,
        "use_rslora": config.use_rslora and not vllm,
        "use_dora": config.use_dora,
        "init_lora_weights": True,
        "fan_in_fan_out": any(is_conv1d),
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
    by_name = {entry.name: entry for entry in exported}
    selected = [name for name, _ in find_targets(model, parsed)]
    problems = []
    if set(selected) != set(by_name):
        problems.append(
            f"the config selects {sorted(set(selected) ^ set(by_name))[:4]} differently from the adapter"
        )
    for name in set(selected) & set(by_name):
        entry = by_name[name]
        r, alpha = parsed.rank_for(name), parsed.alpha_for(name)
        scaling = alpha / math.sqrt(r) if parsed.use_rslora else alpha / r
        if r != entry.r or not math.isclose(scaling, entry.scaling, rel_tol=1e-6):
            problems.append(f"{name}: config gives r={r}, scaling={scaling:g}; tensors have r={entry.r}")
        shape_A, shape_B = entry.layer.adapter_shapes(r)
        if tuple(entry.A.shape) != shape_A or tuple(entry.B.shape) != shape_B:
            problems.append(f"{name}: tensors {tuple(entry.A.shape)}, {tuple(entry.B.shape)} for r={r}")
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
def lora_config_from_peft(peft_config: Mapping[str, Any], model: nn.Module) -> LoraConfig:
    """Translate a PEFT ``adapter_config.json`` (as a dict) into a :class:`LoraConfig` for ``model``.

    ``modules_to_save`` entries are resolved with PEFT's rule (a module whose name ends with the entry) into full
    module names; entries that match nothing are dropped, as PEFT does (task heads such as ``"score"``).

    Args:
        peft_config: The parsed ``adapter_config.json``.
        model: The model the adapter is for (resolves ``modules_to_save``).

    Raises:
        ValueError: Another ``peft_type`` than LoRA, PEFT options without a lightning_lora equivalent (listed), an
            unsupported ``init_lora_weights``, or values ``LoraConfig`` rejects.
    """
    values = dict(peft_config)
    peft_type = values.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise ValueError(
            f"This adapter has peft_type={peft_type!r}; lightning_lora reads LoRA adapters (peft_type 'LORA', "
            "including rsLoRA and DoRA) only. Load it with peft.PeftModel.from_pretrained instead."
        )
    unsupported = {
        key: value
        for key, value in values.items()
        if key not in _TRANSLATED_FIELDS | _IGNORED_FIELDS and value not in (None, False, {}, [], "")
    }
    if unsupported:
        raise ValueError(
            f"PEFT options {unsupported} have no lightning_lora equivalent, so this adapter would load wrongly. "
            "Use an adapter trained without them, or load it with peft.PeftModel.from_pretrained."
        )
    if values.get("target_modules") is None:
        raise ValueError("The PEFT config names no target_modules; lightning_lora adapts modules, not parameters.")
    layers_pattern = values.get("layers_pattern")
    if isinstance(layers_pattern, (list, tuple)):
        if len(layers_pattern) != 1:
            raise ValueError(f"layers_pattern={layers_pattern!r}: lightning_lora supports one layers_pattern.")
        layers_pattern = layers_pattern[0]
    return LoraConfig(
        r=values.get("r", 8),
        alpha=values.get("lora_alpha", 8),
        dropout=values.get("lora_dropout") or 0.0,
        target_modules=values["target_modules"],
        exclude_modules=values.get("exclude_modules"),
        rank_pattern=dict(values.get("rank_pattern") or {}),
        alpha_pattern=dict(values.get("alpha_pattern") or {}),
        layers_to_transform=values.get("layers_to_transform"),
        layers_pattern=layers_pattern,
        bias=values.get("bias") or "none",
        modules_to_save=_resolve_peft_modules_to_save(values.get("modules_to_save"), model),
        use_rslora=bool(values.get("use_rslora")),
        use_dora=bool(values.get("use_dora")),
        init=_init_from_peft(values.get("init_lora_weights", True)),
    )


def _resolve_peft_modules_to_save(entries: Optional[list[str]], model: nn.Module) -> Optional[list[str]]:
    if not entries:
        return None
    found = [name for name in base_module_names(model) if any(name.endswith(entry) for entry in entries)]
    return found or None


def _init_from_peft(init_lora_weights: Any) -> str:
    if init_lora_weights in (True, False, None):
        return "kaiming"  # the adapter's trained values replace the initial ones
    try:
        if str(init_lora_weights).startswith("loftq"):
            # PEFT's LoftQ adapter belongs to the LoftQ-modified base PEFT saved with it (and ignores the scaling).
            raise ValueError("a PEFT LoftQ adapter needs the base model PEFT saved with it")
        check_init_name(str(init_lora_weights))
    except ValueError as err:
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is not supported by lightning_lora ({err}). Convert the adapter "
            "to a plain LoRA in PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        ) from None
    return str(init_lora_weights)


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
    model_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    for peft_key, value in tensors.items():
        our_key = by_peft_key.get(peft_key)
        if our_key is not None:
            if "lora_magnitude" in our_key and value.dim() > 1 and value.numel() == value.shape[1]:
                value = value.reshape(-1)  # PEFT's conv layout [1, out, 1, ...]
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

"""Which modules of a model an adapter config selects, with errors that show what the model does contain."""

from __future__ import annotations

import difflib
import re
from typing import Optional, Union

from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig, LowRankConfig
from lightning_lora.core.config.fields import ALL_LINEAR, pattern_matches
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.containers import AdapterDict
from lightning_lora.core.layers.layer_types import SUPPORTED_LAYERS, _is_hf_conv1d, layer_type_of
from lightning_lora.core.layers.parameter_adapters import SITES, ParameterAdapters

# Leaf names of output heads that "all-linear" leaves alone when the model does not say which is its head.
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output_layer", "embed_out")


def name_matches(name: str, patterns: Union[list[str], str]) -> bool:
    """True when ``name`` is selected by a list of names/dotted suffixes or by a full-match regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: Optional[str]) -> Optional[int]:
    """The block number in a module path (``model.layers.3.self_attn.q_proj`` -> 3), as PEFT reads it."""
    container = re.escape(layers_pattern) if layers_pattern else r"[^.]*"
    match = re.match(rf"(?:.*\.)?{container}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head(s): ``get_output_embeddings()`` when the model has it, else the last
    linear layer whose leaf name is a usual head name."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        return {name for name, module in model.named_modules() if module is head}
    heads = [name for name, m in model.named_modules() if is_linear(m) and name.split(".")[-1] in OUTPUT_HEAD_NAMES]
    return set(heads[-1:])


def bypassed_linears(model: nn.Module) -> set[str]:
    """Linear layers whose owner computes with their weight directly, never calling their forward: the
    ``out_proj`` of ``nn.MultiheadAttention`` (``F.multi_head_attention_forward`` reads ``out_proj.weight``).

    Args:
        model: The model whose module names are returned.
    """
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Skip the adapters' own containers and the modules that mix adapters (X-LoRA's classifier, AM-LoRA's
    # selector, marked ``is_adapter_machinery``), so a later adapter never targets them.
    machinery = [f"{n}." for n, m in model.named_modules() if n and getattr(m, "is_adapter_machinery", False)]
    return [
        (name, module)
        for name, module in model.named_modules()
        if name
        and not isinstance(module, (AdapterDict, ParameterAdapters))
        and not name.endswith(f".{SITES}")
        and not any(f"{name}.".startswith(prefix) for prefix in machinery)
    ]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` that ``config`` adapts, in model order.

    Raises:
        ValueError: Nothing matches (the message lists close module names), or a matched module has a type that
            cannot carry an adapter.
    """
    candidates = _candidate_modules(model)
    saved = set(find_modules_to_save(model, config))
    bypassed = bypassed_linears(model)
    if config.target_modules == ALL_LINEAR:
        skipped = output_head_names(model) | bypassed
        selected = [(n, m) for n, m in candidates if is_linear(m) and n not in skipped]
    else:
        selected = [(n, m) for n, m in candidates if name_matches(n, config.target_modules)]
    selected = [(n, m) for n, m in selected if n not in saved and not any(n.startswith(s + ".") for s in saved)]
    if config.exclude_modules is not None:
        selected = [(n, m) for n, m in selected if not name_matches(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        selected = [(n, m) for n, m in selected if layer_index(n, config.layers_pattern) in wanted]
    if not selected and not config.target_parameters:
        raise ValueError(_no_match_message(candidates, config))

    named_bypassed = sorted(bypassed.intersection(n for n, _ in selected))
    if named_bypassed:
        raise ValueError(
            f"target_modules selects {named_bypassed}: nn.MultiheadAttention computes with out_proj.weight directly "
            "and never calls out_proj's forward, so an adapter there would not change the output. Name the attention "
            "module itself to adapt its in_proj and out_proj (as PEFT), or leave them out (exclude_modules)."
        )
    unsupported = [(n, m) for n, m in selected if layer_type_of(m) is None and not isinstance(m, nn.MultiheadAttention)]
    if unsupported:
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in unsupported[:5])
        raise ValueError(
            f"target_modules selects layers that cannot carry a LoRA adapter: {listed}"
            f"{' ...' if len(unsupported) > 5 else ''}. Supported: {SUPPORTED_LAYERS}. Narrow target_modules "
            "(or add exclude_modules), list such modules in modules_to_save to train them in full, or adapt their "
            "weights with target_parameters."
        )
    return selected


def unmet_requests(model: nn.Module, config: AdapterConfig, adapted: list[str]) -> list[str]:
    """What ``config`` asks for that the model does not have, phrased for a warning: ``layers_to_transform``
    indices no targeted layer has, and ``rank_pattern`` / ``alpha_pattern`` keys that match none of the ``adapted``
    layer names (each a typo or a setting for another model)."""
    unmet = []
    if config.layers_to_transform is not None and config.target_modules != ALL_LINEAR:
        matching = [n for n, _ in _candidate_modules(model) if name_matches(n, config.target_modules)]
        present = {layer_index(n, config.layers_pattern) for n in matching} - {None}
        absent = sorted(set(config.layers_to_transform) - present)
        if absent:
            unmet.append(
                f"layers_to_transform={config.layers_to_transform}: no targeted layer has index {absent} (the targeted "
                f"layers' indices are {sorted(present)}), so only {sorted(set(config.layers_to_transform) & present)} "
                "are adapted"
            )
    if isinstance(config, LowRankConfig):
        for field, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
            idle = [key for key in patterns if not any(pattern_matches(n, key) for n in adapted)]
            if idle:
                unmet.append(f"{field} keys {idle} match no adapted layer, so they change nothing")
    return unmet


def weights_all_linear_skips(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Weights (parameters of 2 or more dimensions) that ``"all-linear"`` cannot reach because their module is no
    layer type an adapter fits: fused mixture-of-experts tensors (``experts.gate_up_proj``, ``[experts, out, in]``),
    routers that are not ``nn.Linear``, ``nn.MultiheadAttention.in_proj_weight``. Empty for other targets.

    Args:
        model: The model being adapted.
        config: The adapter's config.
    """
    if config.target_modules != ALL_LINEAR:
        return []
    saved = tuple(f"{name}." for name in find_modules_to_save(model, config))
    adapted = config.target_parameters or []
    skipped = []
    for module_name, module in _candidate_modules(model):
        if layer_type_of(module) is not None or isinstance(module, LoraLayer):
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            name = f"{module_name}.{parameter_name}"
            # A leading 1 marks a broadcast tensor (position embeddings, class tokens), not a layer's weight.
            matrix = parameter.dim() >= 2 and parameter.shape[0] != 1 and parameter.is_floating_point()
            targeted = any(name == entry or name.endswith("." + entry) for entry in adapted)
            if matrix and not name.startswith(saved) and not targeted:
                skipped.append(f"{name} {list(parameter.shape)} ({type(module).__name__})")
    return skipped


def find_modules_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """Modules named by ``config.modules_to_save`` (outermost matches only), keyed by name.

    Raises:
        ValueError: An entry matches no module.
    """
    if not config.modules_to_save:
        return {}
    candidates = _candidate_modules(model)
    found: dict[str, nn.Module] = {}
    for entry in config.modules_to_save:
        matches = [(n, m) for n, m in candidates if name_matches(n, [entry])]
        if not matches:
            close = _close_names([n for n, _ in candidates], entry)
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model{close}.")
        for name, module in matches:
            if isinstance(module, LoraLayer):
                raise ValueError(f"{name} carries a LoRA adapter and cannot also be in modules_to_save.")
            found[name] = module
    # Keep the outermost module when both a module and one of its children were named.
    return {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found if o != n)}


def _close_names(names: list[str], wanted: str) -> str:
    leaves = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(wanted.split(".")[-1], leaves, n=6, cutoff=0.4)
    close += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6) if n not in close]
    return f"; close names: {close}" if close else f"; module names look like: {leaves[:12]}"


def _no_match_message(candidates: list[tuple[str, nn.Module]], config: AdapterConfig) -> str:
    names = [n for n, _ in candidates]
    linear_leaves = sorted({n.split(".")[-1] for n, m in candidates if layer_type_of(m) is not None})
    message = f"target_modules={config.target_modules!r} matches no layer of the model"
    if config.exclude_modules is not None or config.layers_to_transform is not None:
        message += " (after exclude_modules / layers_to_transform)"
    if isinstance(config.target_modules, list):
        hints = []
        for wanted in config.target_modules:
            hints += [c for c in difflib.get_close_matches(wanted, linear_leaves, n=4, cutoff=0.4) if c not in hints]
        if hints:
            message += f". Close names: {hints}"
    elif config.target_modules != ALL_LINEAR:
        message += f". Example full names: {names[:6]}"
    return message + f". Layers that can take an adapter here: {linear_leaves[:20]}."

"""Adding adapters to a model, choosing what trains, and taking adapters away again."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import torch
from torch import nn

from lightning_lora.core.config import LoraConfig
from lightning_lora.core.initializers import initialize_adapter, initializer_supports
from lightning_lora.core.layers import (
    AdapterSettings,
    LoraLayer,
    adapter_kind,
    lora_class,
    lora_layers,
)
from lightning_lora.core.targeting import find_modules_to_save, find_targets
from lightning_lora.core.variants import VARIANTS

# Marks modules whose own state trains and is saved with an adapter: {adapter: ("bias",)} for a trained bias,
# {adapter: ()} for a whole module in modules_to_save.
SAVED_WITH = "_lora_saved_with"
WHOLE_MODULE: tuple[str, ...] = ()


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter to every layer that ``config`` targets, in place, and freeze everything else.

    Trainable afterwards: the new adapter's tensors, ``config.modules_to_save`` and the biases chosen by
    ``config.bias``. State-dict keys of the base model do not change; adapter tensors appear as
    ``<layer>.lora_A.<adapter_name>`` and ``<layer>.lora_B.<adapter_name>`` (DoRA: ``<layer>.lora_magnitude.<name>``).
    All checks run before anything is changed: on any error the model is left exactly as it was.

    Args:
        model: Any ``nn.Module`` (a Hugging Face model, a torchvision model, a LightningModule, a single layer).
        config: What to adapt and how.
        adapter_name: Name of the new adapter; several adapters can live side by side.

    Returns:
        The same ``model``.

    Raises:
        ValueError: Invalid adapter name or one already in use, targets matching nothing or of unsupported types,
            ranks too large for a layer, an init method undefined for a targeted layer type.
    """
    _check_new_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    modules_to_save = find_modules_to_save(model, config)
    settings = {name: _settings_for(name, module, config) for name, module in targets}

    previous_flags = [(p, p.requires_grad) for p in model.parameters()]
    previous_marks = {m: dict(getattr(m, SAVED_WITH, {})) for m in model.modules()}
    converted: list[nn.Module] = []
    try:
        for name, module in targets:
            if not isinstance(module, LoraLayer):
                kind = adapter_kind(module)
                module.__class__ = lora_class(kind, type(module))
                module._init_lora_state()
                converted.append(module)
            _add_adapter(module, adapter_name, settings[name])
        _mark_saved_modules(model, config, adapter_name, modules_to_save, [m for _, m in targets])
        mark_only_adapters_trainable(model, adapter_name)
    except BaseException:
        _rollback(model, adapter_name, converted, previous_flags, previous_marks)
        raise
    return model


def _check_new_adapter_name(model: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}.")
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"The model already has an adapter named {adapter_name!r}; pass another adapter_name, or remove it "
            f"first with delete_adapter(model, {adapter_name!r})."
        )


def _settings_for(name: str, module: nn.Module, config: LoraConfig) -> AdapterSettings:
    kind = adapter_kind(module)
    in_features, out_features, kernel = kind.lora_dims(module)
    max_rank = min(in_features * max(1, _prod(kernel)), out_features)
    r = config.rank_for(name)
    if r > max_rank:
        raise ValueError(
            f"Rank r={r} is too large for {name} ({type(module).__name__}, {in_features} -> {out_features}): "
            f"at most {max_rank}. Lower r, or set a smaller rank for it with rank_pattern={{{name.split('.')[-1]!r}: "
            f"{max_rank}}}."
        )
    if not initializer_supports(config.init, kind):
        raise ValueError(
            f"init={config.init!r} is not defined for {name} ({type(module).__name__}). Use init='kaiming' or "
            "leave such layers out with exclude_modules."
        )
    return AdapterSettings(
        r=r,
        alpha=config.alpha_for(name),
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        variant=config.variant,
        init=config.init,
        config=config,
    )


def _prod(values: tuple[int, ...]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters are float32 on low-precision or quantised bases (as PEFT's default), else the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _add_adapter(layer: LoraLayer, adapter_name: str, settings: AdapterSettings) -> None:
    shape_A, shape_B = layer.adapter_shapes(settings.r)
    options = {"device": layer.weight.device, "dtype": adapter_dtype(layer.weight)}
    layer.lora_A[adapter_name] = nn.Parameter(torch.zeros(shape_A, **options))
    layer.lora_B[adapter_name] = nn.Parameter(torch.zeros(shape_B, **options))
    VARIANTS[settings.variant].add_parameters(layer, adapter_name, **options)
    layer.lora_settings[adapter_name] = settings
    layer.active_adapters.append(adapter_name)
    initialize_adapter(layer, adapter_name)  # deferred while the weights are on the meta device


def adapter_tensor_dicts(layer: LoraLayer, adapter_name: str) -> list[str]:
    """Names of the layer's ParameterDicts that hold tensors of ``adapter_name`` (``lora_A``, ``lora_B``, ...)."""
    variant = VARIANTS[layer.lora_settings[adapter_name].variant]
    return ["lora_A", "lora_B", *variant.parameter_dicts]


def adapter_parameters(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """``(state-dict key, parameter)`` of every tensor of one adapter in the LoRA layers of ``model``."""
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            prefix = f"{name}." if name else ""
            for dict_name in adapter_tensor_dicts(layer, adapter_name):
                yield f"{prefix}{dict_name}.{adapter_name}", getattr(layer, dict_name)[adapter_name]


def _mark_saved_modules(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    modules_to_save: dict[str, nn.Module],
    adapted: list[nn.Module],
) -> None:
    for module in modules_to_save.values():
        _marks(module)[adapter_name] = WHOLE_MODULE
    if config.bias == "none":
        return
    with_bias = adapted if config.bias == "lora_only" else list(model.modules())
    for module in with_bias:
        if isinstance(getattr(module, "bias", None), nn.Parameter) and adapter_name not in _marks(module):
            _marks(module)[adapter_name] = ("bias",)


def _marks(module: nn.Module) -> dict[str, tuple[str, ...]]:
    if SAVED_WITH not in module.__dict__:
        module.__dict__[SAVED_WITH] = {}
    return module.__dict__[SAVED_WITH]


def saved_module_state(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(state-dict key, tensor)`` of the non-adapter state that trains with ``adapter_name`` (modules_to_save,
    trained biases)."""
    for name, module in model.named_modules():
        local = getattr(module, SAVED_WITH, {}).get(adapter_name)
        if local is None:
            continue
        prefix = f"{name}." if name else ""
        if local == WHOLE_MODULE:
            for key, value in module.state_dict().items():
                yield prefix + key, value
        else:
            for attribute in local:
                yield prefix + attribute, getattr(module, attribute)


def mark_only_adapters_trainable(model: nn.Module, adapter_name: str) -> nn.Module:
    """Freeze every parameter, then unfreeze the tensors of ``adapter_name`` and the state saved with it.

    Args:
        model: A model with LoRA adapters.
        adapter_name: The adapter to train.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, parameter in adapter_parameters(model, adapter_name):
        parameter.requires_grad_(True)
    for module in model.modules():
        local = getattr(module, SAVED_WITH, {}).get(adapter_name)
        if local == WHOLE_MODULE:
            module.requires_grad_(True)
        elif local:
            for attribute in local:
                getattr(module, attribute).requires_grad_(True)
    return model


def _rollback(
    model: nn.Module,
    adapter_name: str,
    converted: list[nn.Module],
    previous_flags: list[tuple[nn.Parameter, bool]],
    previous_marks: dict[nn.Module, dict],
) -> None:
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings or adapter_name in layer.lora_A:
            _remove_layer_adapter(layer, adapter_name)
    for module in converted:
        if isinstance(module, LoraLayer):
            _restore_base_class(module)
    for module, marks in previous_marks.items():
        if marks:
            module.__dict__[SAVED_WITH] = marks
        else:
            module.__dict__.pop(SAVED_WITH, None)
    for parameter, flag in previous_flags:
        parameter.requires_grad_(flag)


def _remove_layer_adapter(layer: LoraLayer, adapter_name: str) -> None:
    for dict_name in ("lora_A", "lora_B", *{d for v in VARIANTS.values() for d in v.parameter_dicts}):
        container = getattr(layer, dict_name, None)
        if container is not None and adapter_name in container:
            del container[adapter_name]
    layer.lora_settings.pop(adapter_name, None)
    layer.merge_state.pop(adapter_name, None)
    if adapter_name in layer.active_adapters:
        layer.active_adapters.remove(adapter_name)


_LORA_ATTRIBUTES = (
    "lora_settings",
    "active_adapters",
    "merged_adapters",
    "adapters_disabled",
    "merge_state",
)


def _restore_base_class(layer: LoraLayer) -> nn.Module:
    """Turn a LoRA layer back into its plain base class (adapters dropped, weights as they are)."""
    for dict_name in ("lora_A", "lora_B", *{d for v in VARIANTS.values() for d in v.parameter_dicts}):
        layer._modules.pop(dict_name, None)
    for attribute in _LORA_ATTRIBUTES:
        layer.__dict__.pop(attribute, None)
    layer.__class__ = layer.base_class
    return layer


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_settings))
    return list(names)


def get_lora_config(model: nn.Module, adapter_name: str = "default") -> LoraConfig:
    """The ``LoraConfig`` an adapter was created with.

    Raises:
        ValueError: The model has no adapter of that name.
    """
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            return layer.lora_settings[adapter_name].config
    raise ValueError(f"The model has no adapter {adapter_name!r}; it has {adapter_names(model)}.")


def _check_known(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; the model has {known}.")


def set_active_adapters(model: nn.Module, names: Union[str, list[str]]) -> nn.Module:
    """Choose which adapters take part in forward (in this order). Trainability is not changed.

    Args:
        model: A model with LoRA adapters.
        names: One adapter name or a list of them.
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_settings]
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one adapter; layers left without adapters become plain modules again.

    Raises:
        ValueError: Unknown adapter, or the adapter is merged (call ``unmerge_lora`` first).
    """
    _check_known(model, [adapter_name])
    merged = [name for name, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"Adapter {adapter_name!r} is merged into {merged[:3]}...; call unmerge_lora(model) first.")
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            _remove_layer_adapter(layer, adapter_name)
            if not layer.lora_settings:
                _restore_base_class(layer)
    for module in model.modules():
        getattr(module, SAVED_WITH, {}).pop(adapter_name, None)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes as its base model (merged adapters are taken out and put back).

    Example::

        with disable_adapters(model):
            reference = model(x)  # base-model output
    """
    from lightning_lora.core.merge import merge_lora, unmerge_lora

    layers = [layer for _, layer in lora_layers(model)]
    merged = {layer: list(layer.merged_adapters) for layer in layers if layer.merged_adapters}
    previous = [layer.adapters_disabled for layer in layers]
    if merged:
        unmerge_lora(model)
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.adapters_disabled = flag
        for layer, names in merged.items():
            merge_lora(layer, adapter_names=names)


def initialize_pending_adapters(model: nn.Module) -> int:
    """Initialise adapters created while the model was on the meta device, now that real weights exist.

    Returns:
        How many (layer, adapter) pairs were initialised.
    """
    count = 0
    for _, layer in lora_layers(model):
        for adapter_name, settings in layer.lora_settings.items():
            if not settings.initialized and initialize_adapter(layer, adapter_name):
                count += 1
    return count


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged first): the base model again, in place."""
    from lightning_lora.core.merge import unmerge_lora

    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        unmerge_lora(model)
    return strip_adapters(model)


def strip_adapters(model: nn.Module) -> nn.Module:
    """Drop every adapter and saved-module mark as they are (merged deltas stay in the weights)."""
    for _, layer in lora_layers(model):
        _restore_base_class(layer)
    for module in model.modules():
        module.__dict__.pop(SAVED_WITH, None)
    return model


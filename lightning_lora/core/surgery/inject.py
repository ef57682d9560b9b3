"""Adding adapters to a model (``apply_lora``) and initialising the ones still pending."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from lightning_lora.core.common.distributed import full_parameters, global_rank
from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.inits.initializers import initializer_needs_data, needs_calibration
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import (
    adapter_names,
    mark_only_adapters_trainable,
    mark_saved_modules,
)
from lightning_lora.core.layers.adapter_tensors import adapter_parameters, shared_holder
from lightning_lora.core.layers.containers import AdapterDict, SharedTensors
from lightning_lora.core.quantization.quantize import quantization_step
from lightning_lora.core.quantization.quantized_weights import keep_training_layout
from lightning_lora.core.surgery.sites import TARGET_PLANNERS, TargetContext
from lightning_lora.core.surgery.snapshot import AdapterSnapshot
from lightning_lora.core.targets.targeting import (
    find_modules_to_save,
    find_targets,
    unmet_requests,
    weights_all_linear_skips,
)

logger = logging.getLogger(__name__)



def apply_lora(
    model: nn.Module, config: AdapterConfig, adapter_name: str = "default", initialize: bool = True
) -> nn.Module:
    """Add an adapter to every layer that ``config`` targets, in place, and freeze the base model.

    The adapter's kind is its config's class: :class:`LoraConfig` (LoRA, rsLoRA, DoRA), ``LoHaConfig``, ...
    Trainable afterwards: the new adapter's tensors, ``config.modules_to_save`` and the biases chosen by
    ``config.bias``, plus whatever trained with adapters added earlier (freeze those with
    :func:`mark_only_adapters_trainable`). State-dict keys of the base model do not change; adapter tensors appear as
    ``<layer>.lora_A.<adapter_name>`` and ``<layer>.lora_B.<adapter_name>`` (DoRA: ``<layer>.lora_magnitude.<name>``).
    With ``config.quantization`` the selected ``nn.Linear`` layers are quantised in place with bitsandbytes after
    the adapters are initialised (QLoRA); adapters stay in full precision. Bitsandbytes 4-bit layers are kept in
    their trainable layout (:func:`~lightning_lora.core.quantization.quantized_weights.keep_training_layout`).
    All checks run before anything is changed: on any error the model is left exactly as it was.

    Args:
        model: Any ``nn.Module`` (a Hugging Face model, a torchvision model, a LightningModule, a single layer).
        config: What to adapt and how; the config class chooses the adapter kind.
        adapter_name: Name of the new adapter; several adapters can live side by side.
        initialize: Run ``config.init`` now (deferred anyway while weights are on the meta device). ``False``
            leaves the adapter pending, for when its tensors will be loaded next (resuming, loading a saved
            adapter onto an original base model: no SVD is computed for nothing) or the real base weights come
            later; then load the adapter, or call :func:`initialize_pending_adapters`, before the first forward.
            With ``config.quantization`` a pending init later sees the quantised weights: SVD inits and LoftQ
            need ``True`` to work on the full-precision ones. Data-driven inits (CorDA, EVA) always stay pending
            until :func:`~lightning_lora.core.surgery.calibration.calibrate_adapters`.

    Returns:
        The same ``model``.

    Raises:
        ValueError: Invalid adapter name or one already in use, targets matching nothing or of unsupported types,
            ranks too large for a layer, an init method undefined for a targeted layer type, layers that cannot be
            quantised as ``config.quantization`` asks.
        ImportError: ``config.quantization`` is set and bitsandbytes is not installed.
    """
    _check_new_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    modules_to_save = find_modules_to_save(model, config)
    unreached = weights_all_linear_skips(model, config)
    if unreached:
        warnings.warn(
            f"target_modules='all-linear' adapts linear layers; these weights stay frozen with no adapter: "
            f"{unreached[:4]}{f' and {len(unreached) - 4} more' if len(unreached) > 4 else ''}. Adapt fused "
            "mixture-of-experts weights with target_parameters (e.g. ['experts.gate_up_proj', 'experts.down_proj']), "
            "an nn.MultiheadAttention by naming it in target_modules, or train such modules with modules_to_save.",
            stacklevel=2,
        )
    context = TargetContext(model, config, targets, modules_to_save)
    for planner in TARGET_PLANNERS:
        context.planned += planner.plan(context)
    layer_targets = [(site.name, site.layer) for site in context.planned if site.layer is not None]
    quantization = quantization_step(model, config, layer_targets)
    shared = kind_of(config).shared_tensors(config, layer_targets)
    unmet = unmet_requests(model, config, [site.name for site in context.planned])
    if unmet:
        warnings.warn(
            f"Adapter {adapter_name!r}: " + "; ".join(unmet) + ". Check the names against the model "
            "(lora_layers(model) lists the adapted layers after apply_lora).",
            stacklevel=2,
        )

    still_training = [name for name in adapter_names(model) if _is_training(model, name)]
    snapshot = AdapterSnapshot(model, adapter_name)
    try:
        for site in context.planned:
            layer = site.attach()
            _add_adapter(layer, adapter_name, site.settings(layer))
        _attach_shared(model, adapter_name, shared, layer_targets, kind_of(config).trains_shared)
        if initialize and not initializer_needs_data(kind_of(config).init_name(config)):  # data: calibrate_adapters
            initialize_pending_adapters(model, adapter_name)
        for layer in quantization.run():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_settings:
                layer.lora_settings[adapter_name].kind.after_base_change(layer, adapter_name)  # DoRA norms
        keep_training_layout(model)
        mark_saved_modules(model, config, adapter_name, modules_to_save, [m for _, m in layer_targets])
        mark_only_adapters_trainable(model, [*still_training, adapter_name])
    except BaseException:
        quantization.undo()
        snapshot.restore()
        raise
    return model


def _is_training(model: nn.Module, adapter_name: str) -> bool:
    return any(parameter.requires_grad for _, parameter in adapter_parameters(model, adapter_name))


def check_adapter_name(adapter_name: str) -> None:
    """Raise a ValueError unless ``adapter_name`` can key the adapter containers (an identifier that is not an
    attribute of ``nn.ParameterDict``, such as ``"to"`` or ``"keys"``)."""
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier() or hasattr(AdapterDict, adapter_name):
        raise ValueError(
            f"adapter_name must be a Python identifier that is not an nn.ParameterDict attribute, got "
            f"{adapter_name!r}; e.g. 'default' or 'task_a'."
        )


def _check_new_adapter_name(model: nn.Module, adapter_name: str) -> None:
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"The model already has an adapter named {adapter_name!r}; pass another adapter_name, or remove it "
            f"first with delete_adapter(model, {adapter_name!r})."
        )


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters are float32 on low-precision or quantised bases (as PEFT's default), else the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _add_adapter(layer: LoraLayer, adapter_name: str, settings: AdapterSettings) -> None:
    options = {"device": layer.weight.device, "dtype": adapter_dtype(layer.weight)}
    layer.lora_settings[adapter_name] = settings
    for tensor in settings.kind.tensors(layer, settings):
        if tensor.name not in layer._modules:
            setattr(layer, tensor.name, AdapterDict())
        value = torch.zeros(tensor.shape, **options)
        getattr(layer, tensor.name)[adapter_name] = nn.Parameter(value, requires_grad=tensor.trainable)
    layer.active_adapters.append(adapter_name)
    # apply_lora initialises new adapters together afterwards; one without tensors of its own has nothing to wait for
    settings.initialized = not layer.adapter_containers(adapter_name)


def _attach_shared(
    model: nn.Module,
    adapter_name: str,
    shared: dict[str, torch.Tensor],
    targets: list[tuple[str, LoraLayer]],
    trainable: bool,
) -> None:
    """Put the adapter's shared tensors in the model's one :class:`SharedTensors` per container (made on first use).
    A frozen holder becomes a child of every layer of the adapter; a trainable one a child of :func:`shared_owner`,
    which every layer refers to without owning it (so its parameters have one state-dict key)."""
    for container, tensor in shared.items():
        holder = shared_holder(model, container)
        if holder is None:
            holder = SharedTensors(trainable)
            if trainable:
                shared_owner(model, targets)._modules[container] = holder
        holder[adapter_name] = tensor
        for _, layer in targets:
            if not trainable:
                layer._modules[container] = holder
            elif layer._modules.get(container) is not holder:
                layer.__dict__[container] = holder


_CONTAINER_TYPES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # their forward (or users) iterate every child


def shared_owner(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> nn.Module:
    """The module that holds an adapter's trainable shared tensors: the deepest one containing every targeted layer
    that is neither adapted nor a container (whose forward or users would iterate the holder), so that FSDP2's unit
    around it gathers them for all the layers; the first layer where the model has no such module."""
    paths = [name.split(".") if name else [] for name, _ in targets]
    common = paths[0][: next((i for i, part in enumerate(zip(*paths)) if len(set(part)) > 1), min(map(len, paths)))]
    for depth in range(len(common), -1, -1):
        module = model.get_submodule(".".join(common[:depth]))
        if not isinstance(module, (LoraLayer, *_CONTAINER_TYPES)):
            return module
    return targets[0][1]


def initialize_pending_adapters(
    model: nn.Module,
    adapter_name: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
    progress_after_s: float = 5.0,
) -> int:
    """Initialise adapters that are still pending, now that the real base weights are in place.

    Pending are adapters added on the meta device, re-created by ``reset_parameters()`` when a meta model is
    materialised, or added with ``apply_lora(..., initialize=False)`` and not loaded since. Restored adapters
    (loaded with ``load_state_dict`` or :func:`~lightning_lora.core.files.state.load_adapter_state_dict`) are never
    pending, so a resumed run does not re-run the init. Works on FSDP1 models (inside ``summon_full_params``),
    FSDP2 DTensor shards and DeepSpeed ZeRO-3 partitions; a collective then, so every rank must call it.

    Args:
        model: A model with LoRA adapters.
        adapter_name: Only this adapter (default: all).
        progress: Receives a progress line on rank 0 while the init takes longer than ``progress_after_s``
            (default: ``logging.getLogger("lightning_lora.core.surgery.inject").info``).
        progress_after_s: Seconds after which (and then every this many seconds) a progress line is sent.

    Returns:
        How many (layer, adapter) pairs were initialised.
    """
    pending = [
        (layer, name)
        for _, layer in lora_layers(model)
        for name, settings in layer.lora_settings.items()
        if not settings.initialized and adapter_name in (None, name)
    ]
    if not pending:
        return 0
    uncalibrated = list(dict.fromkeys(name for layer, name in pending if needs_calibration(layer, name)))
    if uncalibrated:
        raise ValueError(
            f"Adapter(s) {uncalibrated} use a data-driven init (CorDA, EVA) that reads calibration batches: call "
            "lightning_lora.calibrate_adapters(model, batches) instead (or train with "
            "LoraCallback(config, calibration_batches=N)). Nothing was initialised."
        )
    report = (progress or logger.info) if global_rank() == 0 else (lambda line: None)
    start = last_report = time.perf_counter()
    count = 0
    with full_parameters(model):
        for done, (layer, name) in enumerate(pending, 1):
            count += layer.initialize_adapter(name)
            now = time.perf_counter()
            if now - last_report >= progress_after_s and done < len(pending):
                left = (now - start) / done * (len(pending) - done)
                report(f"lightning_lora: initialised {done}/{len(pending)} adapter layers in {now - start:.0f}s, "
                       f"about {left:.0f}s left")
                last_report = now
    elapsed = time.perf_counter() - start
    if elapsed >= progress_after_s:
        report(f"lightning_lora: initialised {len(pending)} adapter layers in {elapsed:.0f}s")
    return count

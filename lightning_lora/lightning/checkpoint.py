"""Adapter-only checkpoints: which keys a checkpoint keeps, and whether a checkpoint fits the model.

A LoRA run trains a tiny part of the model, so its checkpoints hold only that part: the adapter tensors, the state
saved with them (``modules_to_save``, trained biases) and any other trainable parameter, next to the optimizer and
loop state. The frozen base comes from wherever the model was built from. Loading checks that every adapter tensor
is in the checkpoint with the model's shape before anything is written, so a checkpoint from another config fails
with a clear message instead of leaving an adapter silently untrained.

:func:`patch_strategy_checkpointing` applies this to a Trainer's strategy, the one place every checkpoint of every
strategy passes through when it is written and read.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import MethodType
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from lightning_lora.core.common.distributed import clean_name
from lightning_lora.core.files.state import adapter_state_dict, key_and_shape_problems
from lightning_lora.core.kinds import ADAPTER_CONTAINERS
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.training.base_updates import trained_base_weight_names

Shapes = dict[str, tuple[int, ...]]
# Where the shapes of a module's adapter tensors are kept once they are known unsharded (FSDP1 flattens them later).
_SHAPES_ATTRIBUTE = "_lora_checkpoint_shapes"
# Where Lightning puts the model in a torch distributed checkpoint (a directory): ModelParallelStrategy, FSDPStrategy.
_DCP_MODEL_PREFIXES = ("state_dict.", "model.")
_PATCHED = "_lightning_lora_patched"


def required_adapter_shapes(module: nn.Module) -> Shapes:
    """Keys and shapes a checkpoint must contain to restore every adapter of ``module``: adapter tensors, the
    ``modules_to_save`` state and trained biases (what :func:`~lightning_lora.core.files.state.adapter_state_dict`
    holds), and the modules that mix adapters (X-LoRA's classifier, AM-LoRA's selector)."""
    remembered = module.__dict__.get(_SHAPES_ATTRIBUTE, {})
    tensors = [item for name in adapter_names(module) for item in adapter_state_dict(module, name).items()]
    for prefix, machinery in module.named_modules():
        if getattr(machinery, "is_adapter_machinery", False):
            tensors += list(machinery.state_dict(prefix=f"{prefix}.").items())
    return {clean_name(key): remembered.get(clean_name(key), tuple(tensor.shape)) for key, tensor in tensors}


def remember_adapter_shapes(module: nn.Module) -> None:
    """Record the adapter shapes of an unwrapped ``module``, for checks after FSDP1 has flattened its parameters."""
    module.__dict__.pop(_SHAPES_ATTRIBUTE, None)
    module.__dict__[_SHAPES_ATTRIBUTE] = required_adapter_shapes(module)


def adapter_checkpoint_keys(module: nn.Module) -> set[str]:
    """State-dict keys an adapter-only checkpoint keeps: every adapter's tensors and saved state, every other
    parameter that trains, and the base weights that training moves (Delta-LoRA)."""
    keys = set(required_adapter_shapes(module))
    keys.update(clean_name(name) for name, parameter in module.named_parameters() if parameter.requires_grad)
    keys.update(clean_name(name) for name in trained_base_weight_names(module))
    return keys


def keep_only(state_dict: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` whose (wrapper-free) key is in ``keys``."""
    return {key: value for key, value in state_dict.items() if clean_name(key) in keys}


def is_adapter_key(key: str) -> bool:
    """True for a key of an adapter tensor (``...q_proj.lora_A.default``)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in ADAPTER_CONTAINERS


def shapes_of(state_dict: Mapping[str, Any]) -> Shapes:
    return {key: tuple(value.shape) for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def check_checkpoint_fits(module: nn.Module, checkpoint_shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise unless the checkpoint restores every adapter tensor of ``module`` with the right shape and holds no
    adapter tensor the model lacks.

    Args:
        module: The model (a LightningModule) with its adapters added.
        checkpoint_shapes: ``{state-dict key: shape}`` of the checkpoint's model state.
        source: How to name the checkpoint in the message (its path).

    Raises:
        ValueError: Missing adapter tensors, unexpected ones (of layers or adapters the model does not have), or
            shape mismatches, listed with the likely fix.
    """
    expected = required_adapter_shapes(module)
    found = {clean_name(key): tuple(shape) for key, shape in checkpoint_shapes.items()}
    unexpected = [key for key in found if is_adapter_key(key) and key not in expected]
    problems = key_and_shape_problems(expected, found, unexpected)
    if problems:
        raise ValueError(
            f"The checkpoint {source} does not fit the model's LoRA adapters {adapter_names(module)}: "
            + "; ".join(problems)
            + ". It was saved with another LoraConfig or kind (r, target_modules, use_dora, modules_to_save, adapter "
            "name) or another model: resume with the config the checkpoint was trained with. Nothing was loaded."
        )


def check_schedule_states(callback_states: Mapping[str, Any], module: Any) -> None:
    """Let each schedule among the Trainer's callbacks refuse a saved state it cannot resume (AM-LoRA's gate, say),
    before the model's keys are checked: its message names the cause.

    Args:
        callback_states: ``checkpoint["callbacks"]``.
        module: The LightningModule (nothing is checked when it has no Trainer).
    """
    for schedule in getattr(getattr(module, "_trainer", None), "callbacks", []):
        saved = callback_states.get(getattr(schedule, "state_key", None))
        if hasattr(schedule, "check_saved_state") and isinstance(saved, dict):
            schedule.check_saved_state(saved)


def check_saved_configs(callback_states: Mapping[str, Any], callbacks: Sequence[Any]) -> None:
    """Raise when an adapter's config (kind and fields) in the checkpoint differs from the one the run uses.

    Args:
        callback_states: ``checkpoint["callbacks"]``, where each ``LoraCallback`` stored its adapter's config.
        callbacks: The run's ``LoraCallback``s.

    Raises:
        ValueError: A field differs (``dropout`` may change between runs; nothing else may).
    """
    for callback in callbacks:
        saved = callback_states.get(callback.state_key)
        before = saved.get("config") if isinstance(saved, dict) else None
        if not isinstance(before, dict):
            continue  # a weights-only checkpoint: the key and shape check stands alone
        now = {"kind": callback.config.kind, **callback.config.to_dict()}
        before = {"kind": saved.get("kind", "lora"), **before}  # checkpoints before the kinds existed hold LoRA
        free = {"dropout", *callback.config.filled_in_training}  # may change between runs
        differing = sorted(k for k in set(now) | set(before) if k not in free and now.get(k) != before.get(k))
        if differing:
            changes = ", ".join(f"{k}: checkpoint {before.get(k)!r} vs now {now.get(k)!r}" for k in differing)
            raise ValueError(
                f"The checkpoint's adapter {callback.adapter_name!r} was trained with another "
                f"{type(callback.config).__name__} ({changes}). "
                "Resume with the config it was trained with, or start a new run without ckpt_path. Nothing was "
                "loaded."
            )


def check_and_complete_checkpoint(
    module: nn.Module, checkpoint: dict[str, Any], callbacks: Sequence[Any], source: str
) -> None:
    """Check that a loaded checkpoint restores every adapter of ``module`` with the config the run uses, then fill
    in the frozen tensors an adapter-only checkpoint leaves out, so the model state loads strictly.

    Raises:
        ValueError: See :func:`check_checkpoint_fits` and :func:`check_saved_configs`.
    """
    state = checkpoint.get("state_dict", {})
    rename_to_module_keys(module, state)
    check_schedule_states(checkpoint.get("callbacks", {}), module)
    check_saved_configs(checkpoint.get("callbacks", {}), callbacks)  # first: a changed field explains the shapes
    check_checkpoint_fits(module, shapes_of(state), source)
    complete_with_model_state(module, state)


def read_checkpoint_header(path: Path, weights_only: Optional[bool] = None) -> Optional[tuple[Shapes, dict]]:
    """``(model state shapes, callback states)`` of a Lightning checkpoint file or distributed checkpoint directory,
    without reading tensor data; None for layouts this does not know (DeepSpeed's) or paths that are not local."""
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return None
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        prefix = next((p for p in _DCP_MODEL_PREFIXES if any(key.startswith(p) for key in metadata)), "")
        shapes = {
            key[len(prefix) :]: tuple(entry.size)
            for key, entry in metadata.items()
            if prefix and key.startswith(prefix) and hasattr(entry, "size")
        }
        extra_path = path / "meta.pt"
        extra = torch.load(extra_path, weights_only=weights_only) if extra_path.is_file() else {}
        return shapes, extra.get("callbacks", {})
    if path.is_file():
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        return shapes_of(checkpoint.get("state_dict", {})), checkpoint.get("callbacks", {})
    return None


COMPILED_NAME_PART = "_orig_mod."  # what ``self.net = torch.compile(self.net)`` puts into every key below ``net``


def rename_to_module_keys(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Rename, in place, keys that name a tensor of ``module`` with other wrapper parts (a checkpoint written from
    a compiled ``net``, ``net._orig_mod.fc1...``, into an uncompiled module, and back)."""
    model_keys = module.state_dict(keep_vars=True).keys()
    by_clean_name = {clean_name(key): key for key in model_keys}
    for key in [key for key in state_dict if key not in model_keys]:
        target = by_clean_name.get(clean_name(key))
        if target is not None and target not in state_dict:
            state_dict[target] = state_dict.pop(key)


def complete_with_model_state(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Fill the keys an adapter-only checkpoint leaves out with the model's own tensors, in place, so a strict
    ``load_state_dict`` accepts it and leaves the frozen base as it is. Only parameters and buffers: the extra
    entries a layer adds to its state dict (bitsandbytes' 4-bit ``weight.absmax``, ...) are no keys it loads."""
    tensors = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    tensors.update(name for name, _ in module.named_buffers(remove_duplicate=False))
    for key, value in module.state_dict(keep_vars=True).items():
        if key in tensors:
            state_dict.setdefault(key, value.detach())


@contextmanager
def state_dict_limited_to(module: nn.Module, keys: set[str]) -> Iterator[None]:
    """Within the block, ``module.state_dict()`` holds only ``keys`` (wrapper-free names).

    ``torch.distributed.checkpoint.load`` fills the state dict it is given and raises on keys missing from the
    files; limiting the state dict to the keys the files hold makes an adapter-only checkpoint loadable.
    """

    def limit(_: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in list(state_dict):
            if key.startswith(prefix) and clean_name(key[len(prefix) :]) not in keys:
                del state_dict[key]

    handle = module.register_state_dict_post_hook(limit)
    try:
        yield
    finally:
        handle.remove()


def patch_strategy_checkpointing(strategy: Any, callbacks_of: Callable[[Any], Sequence[Any]]) -> None:
    """Make the strategy's checkpoints adapter-only and its checkpoint loading checked.

    ``lightning_module_state_dict`` feeds every checkpoint (also ``save_weights_only`` ones, for which callback
    ``on_save_checkpoint`` hooks do not run); ``load_checkpoint`` reads every checkpoint, before the model state is
    loaded (single device, DDP) or while it is loaded (FSDP, ModelParallel, DeepSpeed). Idempotent.

    Args:
        strategy: The Trainer's strategy.
        callbacks_of: Returns the ``LoraCallback``s that apply to a LightningModule (at call time).
    """
    if strategy.__dict__.get(_PATCHED):
        return
    original_state_dict = strategy.lightning_module_state_dict
    original_load = strategy.load_checkpoint

    def lightning_module_state_dict(self: Any) -> dict[str, Any]:
        state = original_state_dict()
        module = self.lightning_module
        callbacks = callbacks_of(module)
        if not callbacks or not all(c.adapter_only_checkpoints for c in callbacks):
            return state
        kept = keep_only(state, adapter_checkpoint_keys(module))
        if self.restore_checkpoint_after_setup:
            return kept  # sharded checkpoints load through the model's own state-dict keys
        return {key.replace(COMPILED_NAME_PART, ""): value for key, value in kept.items()}

    def load_checkpoint(self: Any, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        module = self.lightning_module
        callbacks = callbacks_of(module)
        if not callbacks:
            return original_load(checkpoint_path, *args, **kwargs)
        return _load_checked(self, module, callbacks, original_load, checkpoint_path, *args, **kwargs)

    strategy.lightning_module_state_dict = MethodType(lightning_module_state_dict, strategy)
    strategy.load_checkpoint = MethodType(load_checkpoint, strategy)
    strategy.__dict__[_PATCHED] = True


def _load_checked(
    strategy: Any,
    module: Any,
    callbacks: Sequence[Any],
    original_load: Any,
    checkpoint_path: Any,
    *args: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    source = str(checkpoint_path)
    if not strategy.restore_checkpoint_after_setup:
        # Single device, DDP: the file is only read here; the model state is loaded later, strictly.
        checkpoint = original_load(checkpoint_path, *args, **kwargs)
        for callback in callbacks:  # an EVA adapter takes the ranks its calibration wrote (LoraCallback)
            if hasattr(callback, "adopt_checkpoint_config"):
                callback.adopt_checkpoint_config(module, checkpoint.get("callbacks", {}))
        check_and_complete_checkpoint(module, checkpoint, callbacks, source)
    else:
        # FSDP, ModelParallel, DeepSpeed load the model state inside load_checkpoint: check the file first, then
        # let torch.distributed.checkpoint see only the keys the files hold.
        weights_only = kwargs.get("weights_only", args[0] if args else None)
        header = read_checkpoint_header(Path(strategy.broadcast(checkpoint_path)), weights_only)
        limit: Any = nullcontext()
        if header is not None:
            shapes, callback_states = header
            check_schedule_states(callback_states, module)
            check_saved_configs(callback_states, callbacks)
            check_checkpoint_fits(module, shapes, source)
            limit = state_dict_limited_to(strategy.model, {clean_name(key) for key in shapes})
        previous = module._strict_loading
        module.strict_loading = False
        waiting = {callback: callback.layers_awaiting_residual(module)  # CorDA adapters restored as shards
                   for callback in callbacks if hasattr(callback, "layers_awaiting_residual")}
        try:
            with limit:
                checkpoint = original_load(checkpoint_path, *args, **kwargs)
        finally:
            module._strict_loading = previous
        if header is not None:  # the load wrote in place, unseen by LoraLayer.prepare_load: rebuild residuals
            for callback, layers in waiting.items():
                callback.rebuild_residuals(layers, {clean_name(key) for key in header[0]})
    for _, layer in lora_layers(module):
        for settings in layer.lora_settings.values():
            settings.initialized = True  # restored: never re-initialise
    return checkpoint

"""Adapter-only checkpoints: which keys a checkpoint keeps, and whether a checkpoint fits the model.

A LoRA run trains a tiny part of the model, so its checkpoints hold only that part: the adapter tensors, the state
saved with them (``modules_to_save``, trained biases) and any other trainable parameter, next to the optimizer and
loop state. The frozen base comes from wherever the model was built from. Loading checks that every adapter tensor
is in the checkpoint with the model's shape before anything is written, so a checkpoint from another config fails
with a clear message instead of leaving an adapter silently untrained.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from lightning_lora.core.distributed import clean_name
from lightning_lora.core.inject import adapter_names
from lightning_lora.core.state import adapter_state_dict, key_and_shape_problems
from lightning_lora.core.variants import VARIANTS

ADAPTER_DICT_NAMES = frozenset(("lora_A", "lora_B", *(d for v in VARIANTS.values() for d in v.parameter_dicts)))
Shapes = dict[str, tuple[int, ...]]
# Where the shapes of a module's adapter tensors are kept once they are known unsharded (FSDP1 flattens them later).
_SHAPES_ATTRIBUTE = "_lora_checkpoint_shapes"
# Torch distributed checkpoints (a directory) hold the model under this key, as Lightning writes them.
_DCP_STATE_KEY = "state_dict."


def required_adapter_shapes(module: nn.Module) -> Shapes:
    """Keys and shapes a checkpoint must contain to restore every adapter of ``module``: adapter tensors, the
    ``modules_to_save`` state and trained biases (what :func:`~lightning_lora.core.state.adapter_state_dict` holds)."""
    shapes = dict(module.__dict__.get(_SHAPES_ATTRIBUTE, {}))
    for name in adapter_names(module):
        for key, tensor in adapter_state_dict(module, name).items():
            shapes.setdefault(clean_name(key), tuple(tensor.shape))
    return shapes


def remember_adapter_shapes(module: nn.Module) -> None:
    """Record the adapter shapes of an unwrapped ``module``, for checks after FSDP1 has flattened its parameters."""
    module.__dict__[_SHAPES_ATTRIBUTE] = {}
    module.__dict__[_SHAPES_ATTRIBUTE] = required_adapter_shapes(module)


def adapter_checkpoint_keys(module: nn.Module) -> set[str]:
    """State-dict keys an adapter-only checkpoint keeps: every adapter's tensors and saved state, and every other
    parameter that trains."""
    keys = set(required_adapter_shapes(module))
    keys.update(clean_name(name) for name, parameter in module.named_parameters() if parameter.requires_grad)
    return keys


def keep_only(state_dict: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` whose (wrapper-free) key is in ``keys``."""
    return {key: value for key, value in state_dict.items() if clean_name(key) in keys}


def is_adapter_key(key: str) -> bool:
    """True for a key of an adapter tensor (``...q_proj.lora_A.default``)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in ADAPTER_DICT_NAMES


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
            + ". It was saved with another LoraConfig (r, target_modules, use_dora, modules_to_save, adapter name) "
            "or another model: resume with the config the checkpoint was trained with. Nothing was loaded."
        )


def check_saved_configs(saved: Mapping[str, Mapping[str, Any]], current: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise when an adapter's ``LoraConfig`` in the checkpoint differs from the one the run uses.

    Args:
        saved: ``{adapter name: LoraConfig.to_dict()}`` from the checkpoint.
        current: The same for the running model.

    Raises:
        ValueError: A field differs (``dropout`` may change between runs; nothing else may).
    """
    for adapter, config in current.items():
        before = saved.get(adapter)
        if before is None:
            continue
        differing = sorted(k for k in set(config) | set(before) if k != "dropout" and config.get(k) != before.get(k))
        if differing:
            changes = ", ".join(f"{k}: checkpoint {before.get(k)!r} vs now {config.get(k)!r}" for k in differing)
            raise ValueError(
                f"The checkpoint's adapter {adapter!r} was trained with another LoraConfig ({changes}). Resume with "
                "the config it was trained with, or start a new run without ckpt_path. Nothing was loaded."
            )


def read_checkpoint_header(path: Path, weights_only: Optional[bool] = None) -> Optional[tuple[Shapes, dict]]:
    """``(model state shapes, callback states)`` of a Lightning checkpoint file or distributed checkpoint directory,
    without reading tensor data; None for layouts this does not know (DeepSpeed's) or paths that are not local."""
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return None
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        shapes = {
            key[len(_DCP_STATE_KEY) :]: tuple(entry.size)
            for key, entry in metadata.items()
            if key.startswith(_DCP_STATE_KEY) and hasattr(entry, "size")
        }
        extra_path = path / "meta.pt"
        extra = torch.load(extra_path, weights_only=weights_only) if extra_path.is_file() else {}
        return shapes, extra.get("callbacks", {})
    if path.is_file():
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        return shapes_of(checkpoint.get("state_dict", {})), checkpoint.get("callbacks", {})
    return None


def complete_with_model_state(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Fill the keys an adapter-only checkpoint leaves out with the model's own tensors, in place, so a strict
    ``load_state_dict`` accepts it and leaves the frozen base as it is."""
    for key, value in module.state_dict(keep_vars=True).items():
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

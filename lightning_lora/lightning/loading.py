"""Getting the trained LightningModule back from a ``LoraCallback`` checkpoint, for inference.

``MyModule.load_from_checkpoint`` never runs callbacks, so the adapters a ``LoraCallback`` added are not there to
receive the checkpoint's tensors. :func:`load_lora_checkpoint` does what the callback did, from what it saved (each
adapter's kind, config and submodule), and then loads the checkpoint strictly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import lightning.pytorch as pl
import torch

from lightning_lora.core.kinds import KINDS
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.surgery.inject import apply_lora
from lightning_lora.core.surgery.merge import merge_lora
from lightning_lora.lightning.checkpoint import (
    check_checkpoint_fits,
    complete_with_model_state,
    rename_to_module_keys,
    shapes_of,
)
from lightning_lora.lightning.fit_support import submodule_of

ModuleType = TypeVar("ModuleType", bound=pl.LightningModule)


def load_lora_checkpoint(
    module_class: type[ModuleType],
    checkpoint_path: Union[str, Path],
    merge: bool = False,
    map_location: Any = "cpu",
    **init_arguments: Any,
) -> ModuleType:
    """The LightningModule a ``LoraCallback`` run trained, with its adapters, from one of its checkpoints.

    The module is built as ``module_class.load_from_checkpoint`` builds it (saved hyperparameters, overridden by
    ``init_arguments``), every adapter the run's ``LoraCallback``\\ s added is added again with the saved config, and
    the checkpoint (adapter-only or full) is loaded strictly: a checkpoint that does not fit fails naming the keys.

    Args:
        module_class: The LightningModule class that was trained.
        checkpoint_path: A checkpoint file written by the run (``last.ckpt``).
        merge: Merge the adapters into the base weights (inference at the base model's cost).
        map_location: Where to load tensors (``torch.load``'s ``map_location``).
        init_arguments: Arguments of ``module_class`` that override the saved hyperparameters.

    Returns:
        The module, with the trained adapters (merged if ``merge``).

    Raises:
        ValueError: The checkpoint holds no ``LoraCallback`` state (a ``LoraMixin`` module loads with
            ``load_from_checkpoint``), or its tensors do not fit the adapters.

    Example::

        model = load_lora_checkpoint(MyModule, "checkpoints/last.ckpt", merge=True).eval()
    """
    path = Path(checkpoint_path)
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    states = [
        state
        for key, state in checkpoint.get("callbacks", {}).items()
        if key.startswith("LoraCallback") and isinstance(state, dict) and "config" in state
    ]
    if not states:
        raise ValueError(
            f"{path} holds no LoraCallback state, so it names no adapters to add. A LoraMixin module (or one saved "
            f"with full weights) loads with {module_class.__name__}.load_from_checkpoint(path)."
        )
    with warnings.catch_warnings():
        # Built without the adapters, the module cannot take the adapter keys yet (and an adapter-only checkpoint
        # lacks the base's): Lightning's key warnings here say nothing. The strict load below checks every key.
        warnings.filterwarnings("ignore", message="Found keys that are (not )?in the model state dict")
        module = module_class.load_from_checkpoint(path, map_location=map_location, strict=False, **init_arguments)
    for state in states:
        config = KINDS[state.get("kind", "lora")].config_class.from_dict(state["config"])
        target = _submodule(module, state.get("submodule"))
        if state["adapter_name"] not in adapter_names(target):  # LoraMixin modules add theirs in __init__
            apply_lora(target, config, state["adapter_name"], initialize=False)  # the checkpoint's values come next
    model_state = dict(checkpoint["state_dict"])
    rename_to_module_keys(module, model_state)
    check_checkpoint_fits(module, shapes_of(model_state), str(path))
    complete_with_model_state(module, model_state)
    module.load_state_dict(model_state, strict=True)
    for _, layer in lora_layers(module):
        for settings in layer.lora_settings.values():
            settings.initialized = True
    if merge:
        merge_lora(module)
    return module


def _submodule(module: pl.LightningModule, path: Optional[str]) -> torch.nn.Module:
    target = submodule_of(module, path)
    if target is None:
        raise ValueError(
            f"The checkpoint's adapter lives in submodule {path!r}, which {type(module).__name__} does not build in "
            "__init__ (a model built in configure_model is not there yet): load with a module that builds it."
        )
    return target

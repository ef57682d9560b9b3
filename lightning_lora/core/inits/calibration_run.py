"""A calibration pass's machinery, and the registry through which data-driven inits take part in it.

An init that reads data (CorDA, :mod:`lightning_lora.core.inits.corda`; EVA, :mod:`lightning_lora.core.inits.eva`)
registers a :class:`CalibrationHook` for its names with :func:`register_calibration`; the runner
(:func:`~lightning_lora.core.surgery.calibration.calibrate_adapters`) knows none of them: it finds each pending
adapter's hook by its init name, lets it collect what it needs, then takes off the layers the hook gave rank 0 and
runs the inits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol

import torch
from torch import nn

from lightning_lora.core.common.distributed import reshard_fsdp2
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers

Forward = Callable[[nn.Module, Any], Any]
TokenMask = Callable[[Any], Optional[torch.Tensor]]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict of tensors (Hugging Face style, PEFT's default), ``model(batch)`` for a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise TypeError(
        f"calibrate_adapters runs model(**batch) for dict batches and model(batch) for tensors, not for a "
        f"{type(batch).__name__}; pass forward=, e.g. forward=lambda model, batch: model(batch[0])."
    )


def language_model_mask(batch: Any, label_mask_value: Optional[int] = None) -> Optional[torch.Tensor]:
    """Which positions count, for dict batches with ``input_ids`` (PEFT's rule): ``attention_mask``, and, given
    ``label_mask_value``, only positions whose per-token ``labels`` differ from it (class labels, one per sample, are
    not a mask). None (every position) for other batches."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    labels = batch.get("labels")
    if label_mask_value is not None and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != label_mask_value)
    return mask


class CalibrationRun:
    """Runs one batch through the model and tells the layer hooks which of its positions count.

    Args:
        model: The model (its parameters' device receives the batch).
        forward: ``forward(model, batch)``.
        token_mask: ``token_mask(batch)``: a bool mask over the leading dimensions of the layer inputs, or None for
            every position; default :func:`language_model_mask`.
    """

    def __init__(self, model: nn.Module, forward: Forward, token_mask: Optional[TokenMask]) -> None:
        self.model, self.forward, self.token_mask = model, forward, token_mask
        self.label_mask_value: Optional[int] = None  # set for EVA's default mask
        self.device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        self.mask: Optional[torch.Tensor] = None

    def __call__(self, batch: Any) -> None:
        batch = _to_device(batch, self.device)
        if self.token_mask is not None:
            self.mask = self.token_mask(batch)
        else:
            self.mask = language_model_mask(batch, self.label_mask_value)
        self.forward(self.model, batch)

    def sample_mask(self, x: torch.Tensor, layer_name: str) -> Optional[torch.Tensor]:
        """The mask fitted to ``x``'s leading dimensions (``[samples, positions...]``), or None."""
        if self.mask is None:
            return None
        mask = self.mask.to(x.device, torch.bool)
        if tuple(mask.shape) == tuple(x.shape[:-1]):
            return mask
        if mask.numel() == x.shape[:-1].numel():
            return mask.reshape(x.shape[:-1])
        raise ValueError(
            f"The batch's token mask {tuple(mask.shape)} does not fit the inputs of {layer_name} {tuple(x.shape)}. "
            "Pass token_mask=lambda batch: None to use every position, or a mask over the layer inputs' leading "
            "dimensions."
        )

    def token_rows(self, x: torch.Tensor, layer_name: str) -> torch.Tensor:
        """The rows of ``x`` (``[..., features]``) at the positions that count, as ``[rows, features]``."""
        mask = self.sample_mask(x, layer_name)
        return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


class CalibrationHook(Protocol):
    """Collects what one data-driven init needs for one adapter, leaving it on the layers for the init to read.

    Args:
        model: The model.
        adapter_name: The adapter being calibrated.
        layers: ``{layer name: layer}`` where the adapter waits for calibration.
        batches: The calibration batches (a list when several adapters calibrate).
        run: Runs one batch (:class:`CalibrationRun`).
        resize: Whether the hook may give layers adapter tensors of another shape.

    Returns:
        ``{layer name: rank}`` after calibration; 0 where the adapter is to be taken off the layer.
    """

    def __call__(
        self,
        model: nn.Module,
        adapter_name: str,
        layers: dict[str, LoraLayer],
        batches: Iterable[Any],
        run: CalibrationRun,
        resize: bool,
    ) -> dict[str, int]: ...


_HOOKS: dict[str, CalibrationHook] = {}


def register_calibration(inits: Iterable[str], hook: CalibrationHook) -> None:
    """Make ``hook`` the calibration of every init name in ``inits``."""
    for init in inits:
        _HOOKS[init] = hook


def calibration_hook(init: str) -> CalibrationHook:
    """The hook registered for ``init``."""
    if init not in _HOOKS:
        raise ValueError(f"init={init!r} registered no calibration (register_calibration); known: {sorted(_HOOKS)}.")
    return _HOOKS[init]


@contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, every adapter off (the base model's activations); all as before afterwards, and
    FSDP2 modules resharded (a forward without backward may leave the root unsharded, and edits of the unsharded
    copies would be lost)."""
    layers = [layer for _, layer in lora_layers(model)]
    disabled = [layer.adapters_disabled for layer in layers]
    training = {module: module.training for module in model.modules()}
    model.eval()
    for layer in layers:
        layer.adapters_disabled = True
    try:
        with torch.no_grad():
            yield
    finally:
        for layer, flag in zip(layers, disabled):
            layer.adapters_disabled = flag
        for module, flag in training.items():
            module.training = flag
        reshard_fsdp2(model)


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: _to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch

"""Data-driven initialisation: run calibration batches through the model and initialise the adapters whose init
reads them (the inits that registered a calibration hook: :mod:`lightning_lora.core.inits.calibration_run`).

Such adapters stay pending after :func:`~lightning_lora.core.surgery.inject.apply_lora`; :func:`calibrate_adapters`
lets each one's hook run the batches through the model with every adapter switched off (the base model's
activations, as PEFT) and collect what its init reads, takes the adapter off the layers its hook gave rank 0, and
runs the inits. Under ``torch.distributed`` the hooks combine the statistics of every process, so every process
computes the same factors and ranks. Adapters that a checkpoint or file restored are not pending and are never
re-calibrated.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from lightning_lora.core.inits.calibration_run import (
    CalibrationRun,
    Forward,
    TokenMask,
    calibration_hook,
    default_forward,
)
from lightning_lora.core.inits.initializers import init_name, needs_calibration
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.surgery.inject import initialize_pending_adapters
from lightning_lora.core.surgery.removal import remove_layer_adapter


def calibrate_adapters(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Optional[Forward] = None,
    adapter_name: Optional[str] = None,
    token_mask: Optional[TokenMask] = None,
    resize: bool = True,
) -> dict[str, dict[str, int]]:
    """Initialise the pending data-driven adapters (``init="corda_ipm"``, ``"corda_kpm"``, ``"eva"``) of ``model``
    from calibration batches.

    The batches run through the model in eval mode, without gradients and with every adapter switched off; each
    adapted layer's inputs are collected with forward hooks. CorDA reads every batch once; EVA cycles through them
    (keeping them in memory) until its components converge. Under ``torch.distributed`` every process must call
    this with the same number of batches (its own share of the data), and all end with the same adapters. A first
    ``N`` batches of a loader: ``itertools.islice(loader, N)``.

    Args:
        model: A model with adapters added by ``apply_lora`` and not restored since.
        batches: Calibration batches, moved to the model's device if they are tensors (or dicts/lists of them).
        forward: ``forward(model, batch)`` runs one batch; default :func:`default_forward`.
        adapter_name: Only this adapter (default: every pending data-driven adapter).
        token_mask: ``token_mask(batch)`` returns a bool mask over the layer inputs' leading dimensions (positions
            that count) or None; default :func:`language_model_mask` (the attention mask of dict batches with
            ``input_ids``; for EVA with ``use_label_mask``, also positions whose label is not ignored).
        resize: Let EVA's rank redistribution give layers new adapter tensors (False: raise instead, for models whose
            parameters a training strategy or an optimizer already holds; always False inside DDP, and for sharded
            adapters).

    Returns:
        ``{adapter name: {layer name: rank}}`` for the adapters initialised (EVA: rank 0 where the adapter was removed).

    Raises:
        ValueError: No batches, inputs with NaN/Inf, EVA not converging or redistributing the ranks of adapters that
            cannot change shape; adapters keep pending then.
    """
    names = _pending_data_adapters(model, adapter_name)
    if not names:
        return {}
    if len(names) > 1 and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # one pass per adapter
    run = CalibrationRun(model, forward or default_forward, token_mask)
    if any(isinstance(module, nn.parallel.DistributedDataParallel) for module in model.modules()):
        resize = False  # DDP holds the parameters: EVA may not swap them
    result = {}
    for name in names:
        layers = {n: layer for n, layer in lora_layers(model) if _uncalibrated(layer, name)}
        hook = calibration_hook(init_name(next(iter(layers.values())).lora_settings[name]))
        ranks = hook(model, name, layers, batches, run, resize)
        for layer_name, rank in ranks.items():
            if rank == 0:
                remove_layer_adapter(layers[layer_name], name)
        initialize_pending_adapters(model, name)
        result[name] = ranks
    return result


def _uncalibrated(layer: LoraLayer, adapter_name: str) -> bool:
    return (
        adapter_name in layer.lora_settings
        and not layer.lora_settings[adapter_name].initialized
        and needs_calibration(layer, adapter_name)
    )


def _pending_data_adapters(model: nn.Module, adapter_name: Optional[str]) -> list[str]:
    names = {n: None for _, layer in lora_layers(model) for n in layer.lora_settings if _uncalibrated(layer, n)}
    return [name for name in names if adapter_name in (None, name)]

"""Data-driven initialisation: run calibration batches through the model and initialise the adapters whose init
reads them (CorDA, :mod:`lightning_lora.core.inits.corda`; EVA, :mod:`lightning_lora.core.inits.eva`).

Such adapters stay pending after :func:`~lightning_lora.core.surgery.inject.apply_lora`; :func:`calibrate_adapters` runs
the batches through the model with every adapter switched off (the base model's activations, as PEFT), collects each
adapted layer's inputs with forward hooks, and runs the inits. Under ``torch.distributed`` the statistics of every
process are combined (CorDA's covariance summed, EVA's inputs gathered), so every process computes the same factors
and ranks; sharded weights (FSDP2) are gathered for the SVD as for PiSSA. Adapters that a checkpoint or file
restored are not pending and are never re-calibrated.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_lora.core.common.distributed import is_distributed, reshard_fsdp2
from lightning_lora.core.config.lora_config import EvaConfig
from lightning_lora.core.inits.corda import CORDA_MODES, CovarianceCollector
from lightning_lora.core.inits.eva import apply_eva_ranks, eva_components
from lightning_lora.core.inits.initializers import CALIBRATION, needs_calibration
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.surgery.inject import initialize_pending_adapters

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
        config = next(iter(layers.values())).lora_settings[name].config
        if config.init in CORDA_MODES:
            result[name] = _calibrate_corda(model, name, layers, batches, run)
        else:
            eva = config.eva_config or EvaConfig()
            run.label_mask_value = eva.label_mask_value if eva.use_label_mask else None
            with _calibrating(model):
                components = eva_components(layers, name, batches, run, eva)
            apply_eva_ranks(model, name, components, resize=resize)
            run.label_mask_value = None
            initialize_pending_adapters(model, name)
            result[name] = {n: int(c.shape[0]) for n, c in components.items()}
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


def _calibrate_corda(
    model: nn.Module, adapter_name: str, layers: dict[str, LoraLayer], batches: Iterable[Any], run: CalibrationRun
) -> dict[str, int]:
    collectors = {name: CovarianceCollector(name) for name in layers}

    def hook_for(name: str) -> Callable[..., None]:
        return lambda module, inputs, output: collectors[name].add(inputs[0], run.sample_mask(inputs[0], name))

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    count = 0
    try:
        with _calibrating(model):
            for batch in batches:
                run(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError(f"CorDA adapter {adapter_name!r}: no calibration batches were given; pass at least one.")
    for name in sorted(layers):
        layer, collector = layers[name], collectors[name]
        in_features = layer.lora_dims()[0]
        device = layer.lora_A[adapter_name].device
        covariance = collector.covariance
        if covariance is None:
            covariance = torch.zeros(in_features, in_features, device=device)
        samples = torch.tensor([collector.samples], dtype=torch.float64, device=covariance.device)
        if is_distributed():  # every process's samples count: all sum the same statistics
            dist.all_reduce(covariance)
            dist.all_reduce(samples)
        if samples.item() == 0:
            raise ValueError(
                f"CorDA adapter {adapter_name!r}: {name} saw no inputs in the calibration batches (is it used in "
                "forward, and does the token mask keep any position?)."
            )
        layer.__dict__.setdefault(CALIBRATION, {})[adapter_name] = {"covariance": covariance / samples.item()}
    initialize_pending_adapters(model, adapter_name)
    return {name: layer.lora_settings[adapter_name].r for name, layer in layers.items()}


@contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
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

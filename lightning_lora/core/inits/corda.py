"""CorDA: context-oriented decomposition adaptation (Yang et al. 2024, https://arxiv.org/abs/2406.05223).

The adapter is built from the SVD of the base weight multiplied by the covariance ``C`` of the layer's inputs over
calibration batches, so the decomposition knows which directions the task's data actually uses::

    W C = U S Vh,    A0 = sqrt(S / scaling) (Vh C^-1)[:r],    B0 = U[:, :r] sqrt(S / scaling)

- ``"corda_ipm"`` (instruction-previewed mode): the ``r`` largest components, the directions the data excites
  most; trains fastest.
- ``"corda_kpm"`` (knowledge-preserving mode): the ``r`` smallest ones, leaving the directions that carry the
  pre-trained knowledge in the frozen residual; forgets less.

As PiSSA, the part ``scaling * B0 @ A0`` moves out of the base weight (the residual stays there), the initial factors
are kept frozen (``lora_init_A``/``lora_init_B``) and saved, so resuming and PEFT export work without the data
(:mod:`lightning_lora.core.inits.svd_init`). The arithmetic is PEFT 0.21's (``preprocess_corda``, ``corda_init``): each
sample's inputs are divided by their largest value, ``C`` is the mean of the samples' ``X^T X`` in float32, damped
by ``0.01 * mean(diag C)`` (doubled until ``C`` inverts to 5%). PEFT runs one sample per forward; here a batch's
first dimension indexes its samples and padded positions are left out, which equals PEFT run on the unpadded samples
one at a time. Collected by its calibration hook, :func:`calibrate_corda`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_lora.core.common.distributed import is_distributed
from lightning_lora.core.inits.calibration_run import CalibrationRun, calibrating, register_calibration
from lightning_lora.core.inits.initializers import CALIBRATION, register_initializer
from lightning_lora.core.inits.svd_init import Factors, svd_initialize
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.layer_types import LinearAdapters

CORDA_MODES = {"corda_ipm": "ipm", "corda_kpm": "kpm"}
_MAX_DAMPING_STEPS = 64


class CovarianceCollector:
    """Sums each sample's ``X^T X`` (``X``: its token rows, divided by their largest value) for one layer.

    Args:
        layer_name: The layer's name, for error messages.
    """

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name
        self.covariance: Optional[torch.Tensor] = None
        self.samples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Add one batch of layer inputs ``x`` (``[samples, ..., in]``); ``mask`` (``[samples, positions]``, bool)
        marks the positions that count (None: all)."""
        x = x.detach()
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        samples = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
        keep = torch.ones(samples.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        keep = keep.reshape(samples.shape[:2])
        present = keep.any(dim=1)
        largest = samples.masked_fill(~keep[..., None], float("-inf")).flatten(1).amax(dim=1).abs()
        largest = torch.where(present, largest, torch.ones_like(largest))
        scaled = samples / largest[:, None, None] * keep[..., None]
        if not torch.isfinite(scaled).all():
            raise ValueError(
                f"CorDA calibration: the inputs of {self.layer_name} hold NaN/Inf, or a sample whose largest value "
                "is 0 (PEFT refuses these too). Check the calibration batches and the model's dtype."
            )
        rows = scaled.reshape(-1, scaled.shape[-1])
        covariance = rows.t() @ rows
        self.covariance = covariance if self.covariance is None else self.covariance + covariance
        self.samples += int(present.sum())


def corda_factors(weight: torch.Tensor, covariance: torch.Tensor, r: int, scaling: float, mode: str) -> Factors:
    """CorDA's ``(A0 [r, in], B0 [out, r])`` from the SVD of ``weight @ C`` (PEFT's ``collect_eigens_for_layer``,
    ``crop_corda_eigens`` and ``corda_init``).

    Args:
        weight: The base weight ``[out, in]`` in the compute precision.
        covariance: ``C``, the mean input covariance ``[in, in]``.
        r: Adapter rank.
        scaling: The adapter's scaling; ``scaling * B0 @ A0`` is the part moved out of ``weight``.
        mode: ``"ipm"`` (the ``r`` largest components) or ``"kpm"`` (the ``r`` smallest).
    """
    covariance = covariance.to(weight.dtype)
    size = covariance.shape[0]
    eye = torch.eye(size, dtype=covariance.dtype, device=covariance.device)
    damp = 0.01
    for _ in range(_MAX_DAMPING_STEPS):
        damped = covariance + eye * (torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ValueError("CorDA: the input covariance cannot be inverted even with heavy damping; calibrate with more "
                         "(and more varied) samples.")  # fmt: skip
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    V = (Vh @ inverse).t()
    kept = slice(None, r) if mode == "ipm" else slice(-r, None)
    U, S, V = U[:, kept], S[kept] / scaling, V[:, kept]
    return V.t().mul(S.sqrt().view(-1, 1)).contiguous(), U.mul(S.sqrt()).contiguous()


def _corda_init(layer: LoraLayer, adapter_name: str) -> None:
    """CorDA in the mode the adapter's ``init`` names, from the covariance that calibration left on the layer."""
    settings = layer.lora_settings[adapter_name]
    statistics = layer.__dict__.get(CALIBRATION, {}).get(adapter_name)
    if statistics is None:
        raise ValueError(
            f"init={settings.config.init!r} needs the covariance of the layer's inputs: call "
            "lightning_lora.calibrate_adapters(model, batches) (or LoraCallback(config, calibration_batches=N))."
        )
    mode = CORDA_MODES[settings.config.init]
    covariance = statistics["covariance"]
    svd_initialize(layer, adapter_name, lambda w, r, s: corda_factors(w, covariance, r, s, mode))
    del layer.__dict__[CALIBRATION][adapter_name]


for _name in CORDA_MODES:
    register_initializer(_name, _corda_init, layer_types=(LinearAdapters,), keeps_init_factors=True, needs_data=True)


def calibrate_corda(
    model: nn.Module,
    adapter_name: str,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    run: CalibrationRun,
    resize: bool,
) -> dict[str, int]:
    """CorDA's calibration hook: each layer's input covariance, summed over every process, for the init."""
    collectors = {name: CovarianceCollector(name) for name in layers}

    def hook_for(name: str) -> Callable[..., None]:
        return lambda module, inputs, output: collectors[name].add(inputs[0], run.sample_mask(inputs[0], name))

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    count = 0
    try:
        with calibrating(model):
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
    return {name: layer.lora_settings[adapter_name].r for name, layer in layers.items()}


register_calibration(CORDA_MODES, calibrate_corda)

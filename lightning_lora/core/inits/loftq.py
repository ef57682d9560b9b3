"""LoftQ initialisation (Li et al. 2023, https://arxiv.org/abs/2310.08659).

QLoRA starts from ``Q(W) + 0``: the quantisation error ``W - Q(W)`` stays in the model. LoftQ instead picks the base
``Q`` and the adapter ``s B A`` together so that ``Q + s B A`` is close to ``W``, alternating

    Q_t = quantise(W - s B_{t-1} A_{t-1})      (W itself for t = 1)
    s B_t A_t = best rank-r approximation of W - dequantise(Q_t)    (truncated SVD)

for ``K`` iterations (``init="loftq"``: 1, ``init="loftq_iter_<K>"``: K), as PEFT's ``loftq_init``. Unlike PEFT the
adapter is divided by the scaling ``s = alpha / r``, so the approximation holds for any alpha.

The initializer runs on the full-precision layer during ``apply_lora`` and leaves in the base weight the matrix
whose quantisation is ``Q_K``; ``apply_lora`` quantises it right after, with the same options, giving exactly
``Q_K`` (quantisation is deterministic).
"""

from __future__ import annotations

import math
import re

import torch

from lightning_lora.core.common.base_weights import assign_dense_weight, dense_weight
from lightning_lora.core.inits.initializers import kaiming_init, register_initializer
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.layer_types import LinearAdapters
from lightning_lora.core.quantization.quantized_weights import fake_quantize, quantized_bits


def loftq_iterations(init: str) -> int:
    """Number of alternations for an init name: ``"loftq"`` -> 1, ``"loftq_iter_<K>"`` -> K."""
    match = re.fullmatch(r"loftq_iter_(\d+)", init)
    iterations = int(match.group(1)) if match else 1
    if iterations < 1:
        raise ValueError(f"init={init!r}: LoftQ needs at least one iteration, e.g. 'loftq_iter_2'.")
    return iterations


def low_rank_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R`` the best rank-``r`` approximation of ``matrix`` (singular values split evenly)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


@torch.no_grad()
def loftq_init(layer: LoraLayer, adapter_name: str) -> None:
    """Fill ``lora_A``/``lora_B`` with LoftQ's correction and leave the matching pre-quantisation base weight.

    On a layer that is already quantised the full-precision weight is gone: the base stays as it is and the adapter
    starts at zero, as in QLoRA. ``apply_lora`` refuses that case up front; it is reached when ``load_adapter`` adds
    a LoftQ adapter to a quantised model (the file's values then replace these).

    Args:
        layer: The LoRA layer (its config must set ``quantization``).
        adapter_name: The adapter to initialise.

    Raises:
        ValueError: The adapter's config has no ``quantization``.
    """
    settings = layer.lora_settings[adapter_name]
    options = settings.config.quantization
    if options is None:
        raise ValueError(
            f"init={settings.config.init!r} needs LoraConfig.quantization (it chooses the quantised base and the "
            "adapter "
            "together); load the model in full precision and set quantization."
        )
    if quantized_bits(layer) is not None:
        kaiming_init(layer, adapter_name)
        return
    weight = dense_weight(layer)
    original = weight.float()
    scale = math.sqrt(settings.scaling)
    candidate = weight  # what apply_lora will quantise, in the base dtype (so the quantisation repeats exactly)
    iterations = loftq_iterations(settings.config.init)
    for step in range(iterations):
        L, R = low_rank_factors(original - fake_quantize(candidate, options), settings.r)
        if step + 1 < iterations:
            candidate = (original - L @ R).to(weight.dtype)
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    lora_A.copy_((R / scale).to(lora_A.dtype))
    lora_B.copy_((L / scale).to(lora_B.dtype))
    assign_dense_weight(layer, candidate)


register_initializer("loftq", loftq_init, layer_types=(LinearAdapters,), fits_any_base=False)
register_initializer("loftq_iter_", loftq_init, numbered=True, layer_types=(LinearAdapters,), fits_any_base=False)

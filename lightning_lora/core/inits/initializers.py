"""LoRA initialisation methods, by the name used in ``LoraConfig.init``.

Each method fills ``layer.lora_A[name]`` and ``layer.lora_B[name]`` in place so that the layer's output is unchanged
at init; a method may also rewrite the base weight (SVD methods keep the residual there). Register a new method
with :func:`register_initializer`.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
from torch import nn

from lightning_lora.core.config.init_names import check_init_name, is_data_init, register_init_name
from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer
from lightning_lora.core.layers.layer_types import EmbeddingAdapters

Initializer = Callable[[LoraLayer, str], None]
_INITIALIZERS: dict[str, Initializer] = {}
_PREFIXED: dict[str, Initializer] = {}  # e.g. "pissa_niter_" handles "pissa_niter_4"
_LAYER_TYPES: dict[Initializer, Optional[tuple[type[LoraLayer], ...]]] = {}
_KEEPS_INIT_FACTORS: set[Initializer] = set()
_BASE_BOUND_FUNCTIONS: set[Initializer] = set()
_WEIGHT_FREE_NAMES: set[str] = {"kaiming", "gaussian", "orthogonal"}
# Where calibrate_adapters leaves a layer's statistics for a data init: layer.__dict__[CALIBRATION][adapter_name].
CALIBRATION = "_lora_calibration"


def register_initializer(
    name: str,
    function: Initializer,
    *,
    numbered: bool = False,
    layer_types: Optional[tuple[type[LoraLayer], ...]] = None,
    keeps_init_factors: bool = False,
    needs_data: bool = False,
    reads_weight: bool = True,
    fits_any_base: bool = True,
) -> None:
    """Make ``function`` available as ``LoraConfig(init=name)``.

    Args:
        name: The init name. With ``numbered=True`` it is a prefix followed by an integer (``"pissa_niter_"``
            accepts ``"pissa_niter_4"``); the function parses the number from ``layer.lora_settings[...].config.init``.
        function: ``function(layer, adapter_name)``, filling the adapter tensors in place under ``torch.no_grad``.
        numbered: Whether ``name`` is a prefix for numbered variants.
        layer_types: Layer-type mixins the method is defined for (None: all layer types).
        keeps_init_factors: The method moves ``scaling * B0 @ A0`` out of the base weight. The adapter then gets
            frozen ``lora_init_A``/``lora_init_B`` tensors (saved with it) that the function must fill with ``A0``
            and ``B0``; see :mod:`lightning_lora.core.inits.svd_init`.
        needs_data: The method reads statistics of the layer's inputs over calibration batches (CorDA, EVA): the
            adapter stays pending until :func:`~lightning_lora.core.surgery.calibration.calibrate_adapters` runs it.
        reads_weight: The method reads the base weight (False for EVA, which reads only the inputs).
        fits_any_base: An adapter file of this init can be put on the original base (False for LoftQ, whose
            adapter belongs to the quantised base it chose).
    """
    (_PREFIXED if numbered else _INITIALIZERS)[name] = function
    if not reads_weight:
        _WEIGHT_FREE_NAMES.add(name)
    register_init_name(name, numbered, needs_data)
    _LAYER_TYPES[function] = layer_types
    if keeps_init_factors:
        _KEEPS_INIT_FACTORS.add(function)
    if not fits_any_base:
        _BASE_BOUND_FUNCTIONS.add(function)


def initializer_fits_any_base(init: Optional[str]) -> bool:
    """Whether an adapter file of ``init`` may be put on the original base model (see :func:`register_initializer`)."""
    return init is None or resolve_initializer(init) not in _BASE_BOUND_FUNCTIONS


def resolve_initializer(init: str) -> Initializer:
    """The function registered for ``init``; a ValueError listing the valid names otherwise."""
    check_init_name(init)
    if init in _INITIALIZERS:
        return _INITIALIZERS[init]
    return next(f for prefix, f in _PREFIXED.items() if re.fullmatch(re.escape(prefix) + r"\d+", init))


def initializer_supports(init: str, layer_type: type[LoraLayer]) -> bool:
    """Whether the method ``init`` is defined for layers of the given layer-type mixin."""
    layer_types = _LAYER_TYPES[resolve_initializer(init)]
    return layer_types is None or issubclass(layer_type, layer_types)


def initializer_keeps_factors(init: str) -> bool:
    """Whether the method ``init`` leaves a residual in the base weight and keeps its initial factors."""
    return resolve_initializer(init) in _KEEPS_INIT_FACTORS


def weight_dependent_init(init: str) -> bool:
    """True when the method reads the base weight (so it must run after real base weights are loaded)."""
    return init not in _WEIGHT_FREE_NAMES


def initializer_needs_data(init: object) -> bool:
    """Whether ``init`` (any kind's init field value) names a method that reads calibration batches."""
    return is_data_init(init)


def needs_calibration(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether the adapter's init reads calibration data that
    :func:`~lightning_lora.core.surgery.calibration.calibrate_adapters` has not collected for this layer yet."""
    settings = layer.lora_settings[adapter_name]
    return initializer_needs_data(init_name(settings)) and adapter_name not in layer.__dict__.get(CALIBRATION, {})


def init_name(settings: AdapterSettings) -> Optional[str]:
    """The init the adapter starts from, as its kind reads it from the config (None: the kind has no choice)."""
    return settings.kind.init_name(settings.config)


def _zero_embedding_A(layer: LoraLayer, adapter_name: str) -> bool:
    # Embeddings start the other way round (A zero, B normal), as in loralib and PEFT, whatever the method.
    if isinstance(layer, EmbeddingAdapters):
        nn.init.zeros_(layer.lora_A[adapter_name])
        nn.init.normal_(layer.lora_B[adapter_name])
        return True
    return False


def kaiming_init(layer: LoraLayer, adapter_name: str) -> None:
    """A Kaiming-uniform like ``nn.Linear``'s default (loralib's choice), B zero."""
    if not _zero_embedding_A(layer, adapter_name):
        nn.init.kaiming_uniform_(layer.lora_A[adapter_name], a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B[adapter_name])


def gaussian_init(layer: LoraLayer, adapter_name: str) -> None:
    """A normal with std ``1/r``, B zero (PEFT's ``"gaussian"``)."""
    if not _zero_embedding_A(layer, adapter_name):
        nn.init.normal_(layer.lora_A[adapter_name], std=1.0 / layer.lora_settings[adapter_name].r)
        nn.init.zeros_(layer.lora_B[adapter_name])


def orthogonal_init(layer: LoraLayer, adapter_name: str) -> None:
    """A and B built from the odd and even rows of one random orthogonal matrix, so ``B @ A = 0`` while neither is
    zero (https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation, as in PEFT)."""
    if _zero_embedding_A(layer, adapter_name):
        return
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    r = lora_A.shape[0]
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]
    fan_in, fan_out = lora_A[0].numel(), lora_B.shape[0]
    a = (torch.randn(fan_in, r // 2) @ q_odd).t() / 10.0
    b = (torch.randn(r // 2, fan_out).t() @ q_even) / 10.0
    lora_A.copy_(a.reshape(lora_A.shape))
    lora_B.copy_(b.reshape(lora_B.shape))


register_initializer("kaiming", kaiming_init)
register_initializer("gaussian", gaussian_init)
register_initializer("orthogonal", orthogonal_init)

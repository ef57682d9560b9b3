"""SVD-based adapter initialisation: PiSSA, fast PiSSA, MiLoRA and OLoRA.

Each method splits the base weight ``W`` (``[out, in]``) into a part that moves into the adapter and a residual
that stays in the base layer, so the layer computes the same function at init::

    W = W_res + scaling * B0 @ A0,    lora_A = A0 ([r, in]),  lora_B = B0 ([out, r])

- ``"pissa"`` (Meng et al. 2024, https://arxiv.org/abs/2404.02948): the ``r`` largest singular triplets
  ``U S Vh`` of ``W``; ``A0 = sqrt(S / scaling) Vh``, ``B0 = U sqrt(S / scaling)``.
- ``"pissa_niter_<K>"``: the same from ``torch.svd_lowrank`` with ``K`` subspace iterations: approximate, and far
  faster on large layers.
- ``"milora"`` (Wang et al. 2024, https://arxiv.org/abs/2406.09044): the ``r`` smallest singular triplets instead.
- ``"olora"`` (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): ``W = QR``; ``B0 = Q[:, :r]``, ``A0 = R[:r]``.

The arithmetic is PEFT 0.21's (``pissa_init``, ``olora_init``): factors in float32 (float64 for float64 weights),
the residual ``W - scaling * B0 @ A0`` in that precision, cast to the weight's dtype.

The initial factors stay on the layer, frozen, as ``layer.lora_init_A[adapter]`` and ``layer.lora_init_B[adapter]``
and are saved with the adapter. With them a checkpoint rebuilds the residual on an original base weight without
re-running the SVD (:func:`apply_init_residual`), bit for bit as in the original run; an adapter exports as a delta to
the original base weight; and removing the adapter gives the original weight back (:func:`restore_base_weight`).

``torch.svd_lowrank`` draws random numbers from a fixed seed in a forked RNG: every process computes the same
factors whatever its RNG state, and the caller's random stream is left untouched. Sharded weights (FSDP2 DTensors)
are gathered for the SVD and written back as shards; see :mod:`lightning_lora.core.common.distributed`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from lightning_lora.core.common.base_weights import assign_dense_weight, dense_weight
from lightning_lora.core.common.distributed import copy_into, full_tensor
from lightning_lora.core.inits.initializers import register_initializer
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.containers import AdapterDict
from lightning_lora.core.layers.layer_types import LinearAdapters

# Frozen initial factors ``A0`` ([r, in]) and ``B0`` ([out, r]) of adapters whose init moved ``scaling * B0 @ A0``
# out of the base weight (PiSSA, OLoRA, ...), saved with the adapter.
INIT_FACTOR_DICTS = ("lora_init_A", "lora_init_B")

Factors = tuple[torch.Tensor, torch.Tensor]  # (A0 [r, in], B0 [out, r])
FactorFunction = Callable[[torch.Tensor, int, float], Factors]

SVD_SEED = 0  # the seed of torch.svd_lowrank's random projection, the same in every process


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None) -> Factors:
    """PiSSA's ``(A0, B0)`` from the ``r`` largest singular triplets of ``weight`` (``[out, in]``).

    Args:
        weight: The base weight, ``[out, in]``, in the precision to compute in.
        r: Adapter rank.
        scaling: The adapter's ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``); ``scaling * B0 @ A0`` is the
            rank-``r`` truncated SVD of ``weight``.
        niter: None for the exact SVD; otherwise the subspace iterations of ``torch.svd_lowrank``.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return _split_singular_values(U[:, :r], S[:r], Vh[:r], scaling)
    U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
    return _split_singular_values(U, S, V.t(), scaling)


def milora_factors(weight: torch.Tensor, r: int, scaling: float) -> Factors:
    """MiLoRA's ``(A0, B0)``: like :func:`pissa_factors` with the ``r`` smallest singular triplets."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    return _split_singular_values(U[:, -r:], S[-r:], Vh[-r:], scaling)


def olora_factors(weight: torch.Tensor, r: int, scaling: float) -> Factors:
    """OLoRA's ``(A0, B0)``: ``B0`` the first ``r`` columns of ``Q``, ``A0`` the first ``r`` rows of ``R`` in
    ``weight = QR``. As in PEFT, the factors are not divided by ``scaling``."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _split_singular_values(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> Factors:
    root = torch.sqrt(S / scaling)
    return (root[:, None] * Vh).contiguous(), (U * root).contiguous()


def init_residual(weight: torch.Tensor, init_A: torch.Tensor, init_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``weight - scaling * init_B @ init_A``: what the base layer keeps (all ``[out, in]``-layout, same dtype)."""
    return torch.addmm(weight, init_B, init_A, alpha=-scaling)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _whole_weight(layer: LoraLayer) -> torch.Tensor:
    """The layer's whole base weight as ``[out, in]`` in the compute precision (gathered, dequantised)."""
    weight = layer.weight_out_in(full_tensor(dense_weight(layer)))
    return weight.to(_compute_dtype(weight.dtype))


def _whole_factors(layer: LoraLayer, adapter_name: str, dtype: torch.dtype) -> Factors:
    init_A, init_B = (full_tensor(getattr(layer, name)[adapter_name]) for name in INIT_FACTOR_DICTS)
    return init_A.to(dtype).contiguous(), init_B.to(dtype).contiguous()


def _write_weight(layer: LoraLayer, weight_out_in: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    value = layer.weight_out_in(weight_out_in)
    if isinstance(layer.weight, DTensor):
        copy_into(layer.weight, value)
    else:
        assign_dense_weight(layer, value)


@contextmanager
def _fixed_seed(device: torch.device, seed: int = SVD_SEED) -> Iterator[None]:
    """Random numbers drawn on ``device`` inside come from ``seed``; every RNG is as before afterwards."""
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # without waking up every accelerator backend
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        generators = getattr(module, "default_generators", ())
        if generators:
            generators[index].manual_seed(seed)
        else:
            module.manual_seed(seed)
        yield


@torch.no_grad()
def svd_initialize(layer: LoraLayer, adapter_name: str, factors: FactorFunction) -> None:
    """Initialise one adapter from factors of the base weight and leave the residual in the base weight.

    Args:
        layer: A LoRA layer whose adapter ``adapter_name`` keeps initial factors (``lora_init_A``/``lora_init_B``).
        adapter_name: The adapter.
        factors: ``factors(weight [out, in], r, scaling) -> (A0, B0)``.

    Raises:
        TypeError: The base weight is not floating point and no reader for its format is registered.
    """
    settings = layer.lora_settings[adapter_name]
    weight = _whole_weight(layer)
    with _fixed_seed(weight.device):
        init_A, init_B = factors(weight, settings.r, settings.scaling)
    for dict_name, value in zip(("lora_A", "lora_B", *INIT_FACTOR_DICTS), (init_A, init_B, init_A, init_B)):
        copy_into(getattr(layer, dict_name)[adapter_name], value)
    # The residual comes from the factors as stored, so a rebuild from a checkpoint gives the same bits.
    init_A, init_B = _whole_factors(layer, adapter_name, weight.dtype)
    _write_weight(layer, init_residual(weight, init_A, init_B, settings.scaling))


def add_init_factor_tensors(layer: LoraLayer, adapter_name: str) -> None:
    """Give an adapter frozen, zero ``lora_init_A`` ([r, in]) and ``lora_init_B`` ([out, r]) tensors (for a file that
    carries initial factors of an init its config does not name)."""
    lora_A = layer.lora_A[adapter_name]
    shapes = layer.adapter_shapes(layer.lora_settings[adapter_name].r)
    for dict_name, shape in zip(INIT_FACTOR_DICTS, shapes):
        if dict_name not in layer._modules:
            setattr(layer, dict_name, AdapterDict())
        zeros = torch.zeros(shape, device=lora_A.device, dtype=lora_A.dtype)
        getattr(layer, dict_name)[adapter_name] = nn.Parameter(zeros, requires_grad=False)


def svd_init_factors(layer: LoraLayer, adapter_name: str) -> Optional[Factors]:
    """``(A0 [r, in], B0 [out, r])`` of an adapter whose SVD init (PiSSA, OLoRA, MiLoRA) moved ``scaling * B0 @ A0``
    out of the base weight, or None. Such layers keep them in ``layer.lora_init_A`` / ``layer.lora_init_B``."""
    if not has_init_factors(layer, adapter_name):
        return None
    init_A, init_B = (getattr(layer, name)[adapter_name] for name in INIT_FACTOR_DICTS)
    return init_A, init_B


def has_init_factors(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether the adapter keeps initial factors (its init moved part of the base weight into the adapter)."""
    return all(adapter_name in getattr(layer, name, ()) for name in INIT_FACTOR_DICTS)


@torch.no_grad()
def apply_init_residual(layer: LoraLayer, adapter_name: str) -> None:
    """Turn an original base weight into the residual of the adapter's stored initial factors; no SVD is run.

    Use it after loading an adapter's tensors (``lora_init_A``/``lora_init_B`` included) into a layer whose
    adapter was added with ``apply_lora(..., initialize=False)``; the result equals the original run's residual.
    Loading through :func:`~lightning_lora.core.files.state.load_adapter_state_dict` or ``load_state_dict`` does this
    for you.

    Args:
        layer: The LoRA layer.
        adapter_name: The adapter whose initial factors define the residual.

    Raises:
        ValueError: The adapter keeps no initial factors, or the base weight already holds its residual.
    """
    _check_has_factors(layer, adapter_name)
    settings = layer.lora_settings[adapter_name]
    if settings.initialized:
        raise ValueError(
            f"The base weight of adapter {adapter_name!r} already holds its residual; call apply_init_residual only "
            "on an original base weight (add the adapter with apply_lora(..., initialize=False))."
        )
    weight = _whole_weight(layer)
    init_A, init_B = _whole_factors(layer, adapter_name, weight.dtype)
    _write_weight(layer, init_residual(weight, init_A, init_B, settings.scaling))
    settings.initialized = True


@torch.no_grad()
def restore_base_weight(layer: LoraLayer, adapter_name: str) -> None:
    """Give the base weight back the part the adapter's init took from it: ``W_res + scaling * B0 @ A0``.

    Equal to the original weight up to one rounding in the weight's dtype. A no-op for adapters without initial
    factors or not initialised yet.

    Args:
        layer: The LoRA layer.
        adapter_name: The adapter whose initial part goes back into the base weight.
    """
    settings = layer.lora_settings[adapter_name]
    if not (has_init_factors(layer, adapter_name) and settings.initialized):
        return
    weight = _whole_weight(layer)
    init_A, init_B = _whole_factors(layer, adapter_name, weight.dtype)
    _write_weight(layer, torch.addmm(weight, init_B, init_A, alpha=settings.scaling))
    settings.initialized = False


@torch.no_grad()
def adopt_init_factors(
    layer: LoraLayer,
    adapter_name: str,
    init_A: torch.Tensor,
    init_B: torch.Tensor,
    base_weight_restored: bool = False,
) -> None:
    """Make the base weight the residual of initial factors that are about to be loaded into the adapter.

    Called before a state dict's ``lora_init_A``/``lora_init_B`` are copied in. A base weight that is still the
    original (adapter not initialised) becomes the residual of the loaded factors, exactly as in the run that
    saved them. A base weight that holds the residual of other factors (the init ran before the load) is
    corrected: bit-exact when the factors are equal, as they are when the same weights are initialised again.

    Args:
        layer: The LoRA layer.
        adapter_name: The adapter being loaded.
        init_A: The loaded ``A0`` (``[r, in]``; a DTensor shard or a whole tensor).
        init_B: The loaded ``B0`` (``[out, r]``).
        base_weight_restored: The same load also restores the base weight (a full checkpoint, which holds the
            residual): leave the weight alone.

    Raises:
        ValueError: The adapter is merged into the base weight.
    """
    _check_has_factors(layer, adapter_name)
    settings = layer.lora_settings[adapter_name]
    if adapter_name in layer.merged_adapters:
        raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_lora(model) before loading into it.")
    if not base_weight_restored:
        weight = _whole_weight(layer)
        new_A, new_B = full_tensor(init_A).to(weight.dtype).contiguous(), full_tensor(init_B).to(weight.dtype)
        new_B = new_B.contiguous()
        if settings.initialized:
            old_A, old_B = _whole_factors(layer, adapter_name, weight.dtype)
            if torch.equal(old_A, new_A) and torch.equal(old_B, new_B):
                return
            weight = torch.addmm(weight, old_B, old_A, alpha=settings.scaling)
        _write_weight(layer, init_residual(weight, new_A, new_B, settings.scaling))
    settings.initialized = True


def _check_has_factors(layer: LoraLayer, adapter_name: str) -> None:
    if not has_init_factors(layer, adapter_name):
        raise ValueError(
            f"Adapter {adapter_name!r} keeps no initial factors "
            f"(init={layer.lora_settings[adapter_name].config.init!r}); "
            "only SVD-initialised adapters (pissa, pissa_niter_<K>, milora, olora) have a residual base weight."
        )


def pissa_init(layer: LoraLayer, adapter_name: str) -> None:
    """PiSSA with the exact SVD."""
    svd_initialize(layer, adapter_name, pissa_factors)


def pissa_niter_init(layer: LoraLayer, adapter_name: str) -> None:
    """PiSSA with ``torch.svd_lowrank`` and the number of subspace iterations given in the name."""
    niter = int(layer.lora_settings[adapter_name].config.init.rsplit("_", 1)[1])
    svd_initialize(layer, adapter_name, lambda w, r, s: pissa_factors(w, r, s, niter=niter))


def milora_init(layer: LoraLayer, adapter_name: str) -> None:
    """MiLoRA: the minor singular components."""
    svd_initialize(layer, adapter_name, milora_factors)


def olora_init(layer: LoraLayer, adapter_name: str) -> None:
    """OLoRA: QR decomposition."""
    svd_initialize(layer, adapter_name, olora_factors)


# Defined for weights read as [out, in] matrices: nn.Linear and Hugging Face Conv1D (a LinearAdapters subclass).
_SVD_INITS = {"pissa": pissa_init, "milora": milora_init, "olora": olora_init}
for _name, _function in _SVD_INITS.items():
    register_initializer(_name, _function, layer_types=(LinearAdapters,), keeps_init_factors=True)
register_initializer(
    "pissa_niter_", pissa_niter_init, numbered=True, layer_types=(LinearAdapters,), keeps_init_factors=True
)

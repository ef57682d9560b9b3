"""The weights of bitsandbytes-quantised layers as tensors: which layers are quantised, quantising, reading back.

bitsandbytes' 4-bit (``Params4bit``) and 8-bit (``Int8Params``) weight formats are registered with
:mod:`lightning_lora.core.common.base_weights`, so DoRA norms, merging and SVD inits read the dequantised weight and
write back by re-quantising.

**Sharded 4-bit layers (FSDP-QLoRA).** FSDP2's ``fully_shard`` turns a ``Params4bit`` into a ``DTensor`` of its
packed bytes (``uint8``: FSDP2 neither casts frozen integer parameters to its compute dtype nor asks them to share
the trainable parameters' dtype) and, while a forward runs, into a plain unsharded ``Parameter``. Both lose the
``QuantState``; bitsandbytes keeps a copy on the module (``module.quant_state``) and re-attaches it in its forward.
The readers and writers here do the same: a sharded layer is recognised by its class, its packed bytes are
gathered, and the dense weight comes back sharded by rows (``Shard(0)``) like a full-precision FSDP2 weight, so it
meets the sharded adapter factors.

One trap is avoided for every 4-bit layer of an adapted model (:func:`keep_training_layout`): with bitsandbytes
0.50 on a CPU with AVX512-BF16, the first no-grad forward of a ``Linear4bit`` in eval mode (a validation loop,
Lightning's sanity check) repacks the weight for a CPU inference kernel that has no autograd formula. From then on
the layer passes no gradient back to its input (torch only warns), so adapters in earlier layers train on wrong
gradients, or none where no residual path bypasses the layer. The repack also rounds the scales to bfloat16, so it
changes the weights for good.

bitsandbytes is imported lazily: the core works without it until quantisation is asked for.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType
from typing import Any, Optional

import torch
from torch import nn

from lightning_lora.core.common.base_weights import register_weight_format
from lightning_lora.core.common.distributed import copy_into, full_tensor, is_dtensor
from lightning_lora.core.config.quantization_config import QuantizationConfig

PARAMS_4BIT = "Params4bit"
PARAMS_8BIT = "Int8Params"
STORAGE_DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUANTIZE_WARNING = (
    "Writing into a quantised base weight re-quantises it: the layer's output changes by the quantisation rounding "
    "and an unmerge does not restore the previous quantised weight exactly. For an exact full-precision merged model "
    "call dequantize_model(model) before merge_and_unload(model)."
)
BLOCKSIZE_4BIT = 64  # bitsandbytes' default, as in transformers' BitsAndBytesConfig


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or raise an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "Quantising the base model (QLoRA) needs bitsandbytes: pip install 'bitsandbytes>=0.45'."
        ) from err
    return bitsandbytes


def _loaded_bitsandbytes() -> Optional[ModuleType]:
    # A model can only hold bitsandbytes layers when bitsandbytes is imported already.
    return sys.modules.get("bitsandbytes")


def quantized_bits(module: nn.Module) -> Optional[int]:
    """4 or 8 when ``module`` is a bitsandbytes-quantised linear layer (sharded or not), else None."""
    name = type(getattr(module, "weight", None)).__name__
    return 4 if name == PARAMS_4BIT or _is_sharded_4bit(module) else 8 if name == PARAMS_8BIT else None


def _is_sharded_4bit(module: nn.Module) -> bool:
    # A Linear4bit whose weight FSDP2 replaced by a DTensor (or, inside a forward, by the unsharded Parameter).
    bnb = _loaded_bitsandbytes()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit) and type(module.weight).__name__ != PARAMS_4BIT


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every bitsandbytes-quantised linear layer of ``model`` with its name.

    Args:
        model: Any module.
    """
    return [(name, module) for name, module in model.named_modules() if quantized_bits(module) is not None]


def check_sharded_quantization(model: nn.Module) -> None:
    """Refuse quantised layers that a sharding strategy split but that cannot compute sharded.

    bitsandbytes' 8-bit layers keep their scales on the weight tensor (``Int8Params.SCB``), which FSDP2 replaces by
    a ``DTensor``; 4-bit layers keep a copy of their quantisation state on the module and shard fine.

    Args:
        model: Any module, sharded or not.

    Raises:
        ValueError: An 8-bit layer whose weight is sharded.
    """
    bnb = _loaded_bitsandbytes()
    if bnb is None:
        return
    split = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt) and is_dtensor(m.weight)]
    if split:
        raise ValueError(
            f"{split[:3]} are bitsandbytes 8-bit layers sharded by FSDP2, which drops their scales (Int8Params.SCB). "
            "Quantise to 4 bit for sharded training (QuantizationConfig(bits=4), FSDP-QLoRA), or train the 8-bit "
            "base with DDP."
        )


# ----- tensors -----
def quantize_tensor(weight: torch.Tensor, options: QuantizationConfig) -> tuple[torch.Tensor, Any]:
    """Quantise a dense ``[out, in]`` weight as ``options`` says: ``(4-bit data, QuantState)`` or ``(int8, scales)``."""
    functional = import_bitsandbytes().functional
    if options.bits == 4:
        return functional.quantize_4bit(
            weight.contiguous(),
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=options.double_quant,
            quant_type=options.quant_type,
            quant_storage=STORAGE_DTYPES[options.storage_dtype],
        )
    # As bitsandbytes' Int8Params does: row-wise absmax of the half-precision weight.
    data, scales, _ = functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return data, scales


def fake_quantize(weight: torch.Tensor, options: QuantizationConfig) -> torch.Tensor:
    """``weight`` quantised and dequantised again (float32): what a quantised layer computes with."""
    data, state = quantize_tensor(weight, options)
    functional = import_bitsandbytes().functional
    if options.bits == 4:
        return functional.dequantize_4bit(data, state).float()
    return functional.int8_vectorwise_dequant(data, state).float()


# ----- the registered weight formats -----
def _quant_state_4bit(module: nn.Module) -> Any:
    sharded = _is_sharded_4bit(module)
    state = module.quant_state if sharded else module.weight.quant_state
    if state is None:
        raise ValueError(
            f"This {type(module).__name__} holds a weight that is not quantised yet (bitsandbytes quantises on "
            ".to(device)); call model.to('cpu') or model.to('cuda') before using it with lightning_lora."
        )
    if sharded:
        return state
    _unpack_cpu_inference_layout(module)
    return module.weight.quant_state


def _read_4bit(module: nn.Module) -> torch.Tensor:
    state, packed = _quant_state_4bit(module), module.weight.data
    dequantize = import_bitsandbytes().functional.dequantize_4bit
    if not is_dtensor(packed):
        return dequantize(packed, state)
    from torch.distributed.tensor import distribute_tensor

    # Gathered whole, handed back sharded by rows like a full-precision FSDP2 weight.
    return distribute_tensor(dequantize(packed.full_tensor(), state), packed.device_mesh, packed.placements)


def _write_4bit(module: nn.Module, value: torch.Tensor) -> None:
    warnings.warn(REQUANTIZE_WARNING, UserWarning, stacklevel=3)
    state, weight = _quant_state_4bit(module), module.weight
    data, module.quant_state = import_bitsandbytes().functional.quantize_4bit(
        full_tensor(value).to(state.dtype).contiguous(),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=weight.dtype,
    )
    if is_dtensor(weight):
        copy_into(weight, data)  # this rank's slice; the layer's forward takes the state from the module
    else:
        weight.data, weight.quant_state = data, module.quant_state


def _int8_scales(module: nn.Module) -> torch.Tensor:
    # Linear8bitLt's first forward moves the scales from the weight to module.state.
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def _read_8bit(module: nn.Module) -> torch.Tensor:
    if module.weight.dtype != torch.int8:  # Linear8bitLt(has_fp16_weights=True) keeps a dense weight
        return module.weight.detach()
    return import_bitsandbytes().functional.int8_vectorwise_dequant(module.weight.data, _int8_scales(module))


def _write_8bit(module: nn.Module, value: torch.Tensor) -> None:
    if module.weight.dtype != torch.int8:
        module.weight.data.copy_(value)
        return
    warnings.warn(REQUANTIZE_WARNING, UserWarning, stacklevel=3)
    data, scales = quantize_tensor(value, QuantizationConfig(bits=8))
    module.weight.data = data
    module.weight.CB, module.weight.SCB = data, scales
    module.state.CB = module.state.SCB = None  # the next forward takes them from the weight again


register_weight_format(PARAMS_4BIT, _read_4bit, _write_4bit)
register_weight_format("Linear4bit", _read_4bit, _write_4bit)  # by layer class: sharded by FSDP2
register_weight_format(PARAMS_8BIT, _read_8bit, _write_8bit)


def dense_reference(module: nn.Module) -> torch.Tensor:
    """A meta tensor with the shape and dtype that ``dense_weight`` gives for a quantised linear layer."""
    dtype = _quant_state_4bit(module).dtype if quantized_bits(module) == 4 else torch.float32
    return torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")


# ----- the CPU inference repack (see the module docstring) -----
def keep_training_layout(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` in the layout whose matmul has an autograd formula.

    Switches off bitsandbytes' CPU inference repack (which would silently cut the gradient through the layer after
    the first evaluation) and undoes a repack that already happened, keeping the weights as they are now. Each
    layer also gets a forward pre-hook (:func:`follow_packed_weight`) for sharding strategies that move or cast
    its packed weight. :func:`~lightning_lora.apply_lora` calls this on the whole model; call it again after adding
    4-bit layers.

    Args:
        model: Any module; layers other than bitsandbytes ``Linear4bit`` are left alone.
    """
    bnb = _loaded_bitsandbytes()
    if bnb is None:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _unpack_cpu_inference_layout(module)
            module.support_avx512bf16_for_cpu = False
            if follow_packed_weight not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(follow_packed_weight)
    return model


def follow_packed_weight(module: nn.Module, args: tuple) -> None:
    """Before a 4-bit layer computes: its quantisation state moves to the device of its weight (FSDP moves the
    packed bytes, not the state bitsandbytes keeps on the module), and a weight that a mixed-precision policy cast
    away from its storage dtype (FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` casts floating parameters) is
    refused, as its bytes no longer encode the weights."""
    state, weight = getattr(module, "quant_state", None), module.weight
    if state is None:
        return  # not quantised yet (bitsandbytes quantises on .to(device))
    storage = getattr(module, "quant_storage", weight.dtype)
    if weight.dtype != storage:
        raise ValueError(
            f"A 4-bit {type(module).__name__} received its packed weight as {weight.dtype} instead of its storage "
            f"dtype {storage}: a mixed-precision policy cast it, which scrambles the packed 4-bit values. Quantise "
            "with QuantizationConfig(storage_dtype='uint8') (never cast), or store as the policy's param_dtype."
        )
    if state.absmax.device != weight.device:
        state.to(weight.device)


def _unpack_cpu_inference_layout(module: nn.Module) -> None:
    state = getattr(module.weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # The repack stored the scales as bfloat16 [in / blocksize, out]; keep those values (re-quantising them as
    # bitsandbytes' inverse does for double quantisation would change the weights a second time).
    scales = state.absmax.t().reshape(-1).float()
    state.original_nested = False
    module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    state.absmax = scales
    module.weight.quant_state = module.quant_state = state



def dense_scales(state: Any) -> torch.Tensor:
    """The per-block scales of a 4-bit ``QuantState`` as float32 (dequantised when double-quantised)."""
    if not state.nested:
        return state.absmax.float()
    functional = import_bitsandbytes().functional
    return (functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


__all__ = [
    "STORAGE_DTYPES",
    "check_sharded_quantization",
    "dense_reference",
    "dense_scales",
    "fake_quantize",
    "import_bitsandbytes",
    "keep_training_layout",
    "quantize_tensor",
    "quantized_bits",
    "quantized_layers",
]

"""QLoRA: a frozen base quantised with bitsandbytes, full-precision adapters on top.

``apply_lora(model, LoraConfig(..., quantization=QuantizationConfig(bits=4)))`` quantises the selected
``nn.Linear`` layers in place, after the adapters are initialised (so SVD inits and LoftQ see the full-precision
weight and leave a residual that is then quantised): the module object stays the same, its class becomes
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (``LoraLinear4bit`` when it carries adapters). Models whose layers
already are bitsandbytes layers are accepted as they are.

How the quantised weights are stored, read and written (and sharded with FSDP2) is in
:mod:`lightning_lora.core.quantization.quantized_weights`.

One trap is refused up front where it exists: bitsandbytes 0.50's CPU kernel on some machines (AVX512-BF16)
dequantises 4-bit weights whose ``in_features`` is not a multiple of the block size (64) wrongly, so such layers
would compute with scrambled weights. The installed kernel is probed once per shape; where it is wrong, such layers
are named in a ValueError, and where it is right (AVX2-only CPUs, for one) they are quantised as usual.

bitsandbytes is imported lazily: the core works without it until quantisation is asked for.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import nn

from lightning_lora.core.common.base_weights import dense_weight
from lightning_lora.core.common.distributed import is_dtensor
from lightning_lora.core.config.fields import ALL_LINEAR
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.config.quantization_config import QuantizationConfig
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_class
from lightning_lora.core.quantization.quantized_weights import (
    BLOCKSIZE_4BIT,
    dense_scales,
    follow_packed_weight,
    import_bitsandbytes,
    quantize_tensor,
    quantized_bits,
    quantized_layers,
)
from lightning_lora.core.targets.targeting import find_modules_to_save, output_head_names

# Attributes bitsandbytes' constructors set on the module (removed again when a layer is dequantised).
_ATTRIBUTES_4BIT = (
    "compute_dtype", "compute_type_is_set", "quant_state", "quant_storage", "support_avx512bf16_for_cpu"
)
_ATTRIBUTES_8BIT = ("state", "index")
_HOOK_8BIT = "_lora_8bit_load_hook"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----- quantising layers in place -----
def _is_plain_linear(module: nn.Module) -> bool:
    base = module.base_class if isinstance(module, LoraLayer) else type(module)
    return base is nn.Linear


def _check_options_match(name: str, module: nn.Module, options: QuantizationConfig) -> None:
    bits = quantized_bits(module)
    quant_type = getattr(module.weight, "quant_type", None)
    if bits != options.bits or (bits == 4 and quant_type != options.quant_type):
        have = f"{bits}-bit" + (f" {quant_type}" if bits == 4 else "")
        want = f"{options.bits}-bit" + (f" {options.quant_type}" if options.bits == 4 else "")
        raise ValueError(
            f"{name} is already quantised as {have}, but quantization asks for {want}. Set quantization=None to keep "
            "the model's own quantisation, or load the model in full precision."
        )


@functools.lru_cache(maxsize=None)
def _4bit_kernel_dequantizes_correctly(in_features: int, options_key: tuple, device: str) -> bool:
    # bitsandbytes 0.50's CPU dequantisation kernel on AVX512-BF16 machines cuts blocks per row, while quantisation
    # cuts them over the flattened weight: when in_features is not a multiple of the block size the layer computes
    # with scrambled weights. Probe the installed kernel once per shape: every block's largest |value| must come back
    # as its scale.
    quant_type, double_quant = options_key
    options = QuantizationConfig(bits=4, quant_type=quant_type, double_quant=double_quant)
    rows = max(2, -(-4 * BLOCKSIZE_4BIT // in_features))  # at least four whole blocks
    probe = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0)).to(device)
    data, state = quantize_tensor(probe, options)
    restored = import_bitsandbytes().functional.dequantize_4bit(data, state).flatten().float()
    full_blocks = restored.numel() // BLOCKSIZE_4BIT
    block_max = restored[: full_blocks * BLOCKSIZE_4BIT].view(full_blocks, -1).abs().amax(1)
    scales = dense_scales(state)[:full_blocks]
    return torch.allclose(block_max, scales, rtol=1e-3, atol=0.0)


def quantization_fits(options: QuantizationConfig, in_features: list[int], device: str = "cpu") -> bool:
    """Whether the installed bitsandbytes quantises layers of these input sizes correctly with ``options`` (False
    where its CPU kernel scrambles 4-bit weights whose size is not a multiple of the block size).

    Args:
        options: The quantisation.
        in_features: The layers' input sizes.
        device: Where the layers compute.
    """
    if options.bits == 8:
        return True
    key = (options.quant_type, options.double_quant)
    return all(n % BLOCKSIZE_4BIT == 0 or _4bit_kernel_dequantizes_correctly(n, key, device) for n in in_features)


def plan_quantization(model: nn.Module, config: LoraConfig, targets: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The layers that ``apply_lora`` will quantise for ``config``, after checking that it can; changes nothing.

    Args:
        model: The model about to receive an adapter.
        config: The adapter's config; nothing is planned when ``config.quantization`` is None.
        targets: The layers that get the adapter (``find_targets``).

    Raises:
        ImportError: bitsandbytes is missing.
        ValueError: A layer cannot be quantised (meta weights, not floating point, already carries adapters,
            a shape the installed 4-bit kernel mishandles, already quantised differently), LoftQ on an already
            quantised layer, or nothing to quantise.
    """
    options = config.quantization
    if options is None:
        return []
    import_bitsandbytes()
    if options.layers == ALL_LINEAR:
        skipped = output_head_names(model) | set(find_modules_to_save(model, config))
        # nn.Linear subclasses (e.g. nn.MultiheadAttention's out_proj, whose weight is used directly) are left alone.
        candidates = [
            (n, m)
            for n, m in model.named_modules()
            if (_is_plain_linear(m) or quantized_bits(m) is not None)
            and not any(n == s or n.startswith(s + ".") for s in skipped)
        ]
    else:
        candidates = [(n, m) for n, m in targets if isinstance(m, nn.Linear)]
    if not candidates:
        raise ValueError(
            "quantization is set but no selected layer is an nn.Linear (bitsandbytes quantises nn.Linear only); "
            "target linear layers or set quantization=None."
        )
    loftq = config.init.startswith("loftq")
    planned = []
    for name, module in candidates:
        if quantized_bits(module) is not None:
            if loftq and any(module is m for _, m in targets):
                raise ValueError(
                    f"init={config.init!r} needs the full-precision weight of {name}, which is already quantised. "
                    "Load the model in full precision and let apply_lora quantise it (quantization=...)."
                )
            _check_options_match(name, module, options)
            continue
        _check_quantizable(name, module, options)
        planned.append(module)
    if loftq:
        unquantized = [n for n, m in targets if not any(m is p for p in planned) and quantized_bits(m) is None]
        if unquantized:
            raise ValueError(
                f"init={config.init!r} is only defined for layers that get quantised; {unquantized[:3]} stay in full "
                "precision (only nn.Linear is quantised). Leave them out with exclude_modules."
            )
    return planned


def _check_quantizable(name: str, module: nn.Module, options: QuantizationConfig) -> None:
    if not _is_plain_linear(module):
        raise ValueError(
            f"Cannot quantise {name} ({type(module).__name__}): only plain nn.Linear layers are quantised, subclasses "
            "with their own forward are not. Leave it out with exclude_modules or set quantization.layers='targets'."
        )
    if isinstance(module, LoraLayer) and module.lora_settings:
        raise ValueError(
            f"{name} already carries adapters {list(module.lora_settings)}; quantising it now would change the base "
            "they were trained on. Quantise when adding the first adapter, or set quantization=None."
        )
    weight = module.weight
    if weight.is_meta or not weight.is_floating_point():
        raise ValueError(
            f"Cannot quantise {name}: its weight is {'on the meta device' if weight.is_meta else weight.dtype}. "
            "Load real full-precision weights before apply_lora with quantization."
        )
    if options.bits == 4:
        key = (options.quant_type, options.double_quant)
        if not _4bit_kernel_dequantizes_correctly(module.in_features, key, weight.device.type):
            raise ValueError(
                f"Cannot quantise {name} to 4 bit on {weight.device.type}: the installed bitsandbytes kernel "
                f"dequantises weights with in_features={module.in_features} wrongly (in_features must be a multiple "
                f"of {BLOCKSIZE_4BIT} there). Leave it out with exclude_modules, or use bits=8."
            )


def quantize_linear(module: nn.Linear, options: QuantizationConfig) -> nn.Module:
    """Quantise one ``nn.Linear`` (or LoRA layer over one) in place; the module object and its adapters stay.

    Args:
        module: A plain ``nn.Linear`` with real floating-point weights, possibly already carrying LoRA adapters.
        options: How to quantise.

    Returns:
        The same module, now a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (``LoraLinear4bit`` ... with adapters).
    """
    bnb = import_bitsandbytes()
    data, state = quantize_tensor(module.weight.detach(), options)
    if options.bits == 4:
        base_class = bnb.nn.Linear4bit
        module.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=state,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=options.double_quant,
            quant_type=options.quant_type,
            quant_storage=data.dtype,
            bnb_quantized=True,
            module=module,
        )
        module.compute_dtype = _DTYPES[options.compute_dtype]
        module.compute_type_is_set = True
        module.quant_state = state
        module.quant_storage = data.dtype
        module.support_avx512bf16_for_cpu = False  # keep_training_layout
    else:
        base_class = bnb.nn.Linear8bitLt
        module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=state)
        module.state = bnb.MatmulLtState()
        module.state.threshold = options.int8_threshold
        module.state.has_fp16_weights = False
        module.state.use_pool = options.int8_threshold > 0.0
        module.index = None
        # Linear8bitLt's constructor registers this so that its own state dicts (with "weight_format") load.
        hook = module._register_load_state_dict_pre_hook(bnb.nn.modules.maybe_rearrange_weight)
        module.__dict__[_HOOK_8BIT] = hook
    _set_base_class(module, base_class)
    return module


def _set_base_class(module: nn.Module, base_class: type[nn.Module]) -> None:
    module.__class__ = lora_class(module.layer_type, base_class) if isinstance(module, LoraLayer) else base_class


def _strip_quantization(module: nn.Module, weight: nn.Parameter) -> None:
    """Put a full-precision ``weight`` back and make the module a plain ``nn.Linear`` (LoRA layers keep adapters)."""
    for attribute in _ATTRIBUTES_4BIT if quantized_bits(module) == 4 else _ATTRIBUTES_8BIT:
        module.__dict__.pop(attribute, None)
    hook = module.__dict__.pop(_HOOK_8BIT, None)
    if hook is not None:
        hook.remove()
    for key, pre_hook in list(module._forward_pre_hooks.items()):
        if pre_hook is follow_packed_weight:
            del module._forward_pre_hooks[key]
    module.weight = weight
    _set_base_class(module, nn.Linear)


def quantize_layers(layers: list[nn.Module], options: QuantizationConfig) -> Callable[[], None]:
    """Quantise ``layers`` in place, all or none.

    Returns:
        A function that undoes the quantisation exactly (puts the original weight tensors back).
    """
    originals: list[tuple[nn.Module, nn.Parameter]] = []

    def undo() -> None:
        for module, weight in reversed(originals):
            _strip_quantization(module, weight)

    try:
        for module in layers:
            originals.append((module, module.weight))
            quantize_linear(module, options)
    except BaseException:
        undo()
        raise
    return undo


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Turn every bitsandbytes linear layer back into ``nn.Linear`` with its dequantised weight, in place.

    Adapters stay. ``merge_and_unload(dequantize_model(model))`` exports a merged full-precision model whose
    outputs equal the QLoRA model's (the merge adds in full precision; nothing is re-quantised).

    Args:
        model: A model with bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers (others are left alone).
        dtype: dtype of the restored weights; default: the dtype the weight had before 4-bit quantisation,
            float32 for 8-bit layers.

    Raises:
        ValueError: The model is sharded (FSDP2 manages its weights; nothing is changed).
    """
    layers = quantized_layers(model)
    sharded = [name for name, module in layers if is_dtensor(module.weight)]
    if sharded:
        raise ValueError(
            f"{sharded[:3]} are sharded by FSDP2, whose parameters cannot be swapped for dequantised ones. For a "
            "full-precision merged export call save_merged_model(model, directory, dequantize=True) on every rank."
        )
    for _, module in layers:
        dense = dense_weight(module)
        weight = nn.Parameter(dense.to(dtype or dense.dtype).contiguous(), requires_grad=False)
        _strip_quantization(module, weight)
    return model


class QuantizationStep:
    """The quantisation step of ``apply_lora``: planned (checked) before any change, run after the adapters' inits
    (so SVD inits and LoftQ see the full-precision weights and leave a residual to quantise), undone on failure. A
    step with no layers does nothing.

    Args:
        layers: The layers to quantise (:func:`plan_quantization`).
        options: How (``config.quantization``).
    """

    def __init__(self, layers: list[nn.Module], options: Optional[QuantizationConfig]) -> None:
        self.layers, self.options = layers, options
        self._undo: Optional[Callable[[], None]] = None

    def run(self) -> list[nn.Module]:
        """Quantise the layers; return them."""
        if self.layers:
            self._undo = quantize_layers(self.layers, self.options)
        return self.layers

    def undo(self) -> None:
        """Put back what :meth:`run` quantised (nothing if it did not run)."""
        if self._undo is not None:
            self._undo()
            self._undo = None


def quantization_step(model: nn.Module, config: LoraConfig, targets: list[tuple[str, nn.Module]]) -> QuantizationStep:
    """The step that quantises what ``config.quantization`` selects among ``targets``, checked now."""
    return QuantizationStep(plan_quantization(model, config, targets), config.quantization)


__all__ = ["QuantizationStep", "dequantize_model", "plan_quantization", "quantization_step", "quantize_layers",
           "quantize_linear"]

"""Quantised base weights (bitsandbytes 4-bit and 8-bit): their storage and dequantisation, and the step that
quantises a model's targeted layers before adapters go on.

``lightning_lora.core.quantization`` was one module; its names stay importable from here.
"""

from lightning_lora.core.quantization.quantize import (  # noqa: F401
    dequantize_model,
    enable_input_gradients,
    plan_quantization,
    prepare_for_kbit_training,
    quantization_fits,
    quantize_layers,
    quantize_linear,
)

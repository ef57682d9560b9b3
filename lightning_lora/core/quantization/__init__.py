"""Quantised base weights (bitsandbytes 4-bit and 8-bit): their storage and dequantisation, and the step that
quantises a model's targeted layers before adapters go on, and preparing such a model for training.

``lightning_lora.core.quantization`` was one module; its names stay importable from here.
"""

from lightning_lora.core.quantization.kbit_training import (  # noqa: F401
    enable_input_gradients,
    prepare_for_kbit_training,
)
from lightning_lora.core.quantization.quantize import (  # noqa: F401
    dequantize_model,
    plan_quantization,
    quantization_fits,
    quantize_layers,
    quantize_linear,
)

"""``QuantizationConfig``: how the frozen base is quantised (QLoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.config.fields import ALL_LINEAR, config_from_dict


@dataclass
class QuantizationConfig:
    """How :func:`~lightning_lora.apply_lora` quantises the frozen base with bitsandbytes (QLoRA).

    Adapters always stay in full precision on top of the quantised base.

    Args:
        bits: ``4`` (blockwise NF4/FP4, as in QLoRA) or ``8`` (row-wise LLM.int8()).
        quant_type: 4-bit data type: ``"nf4"`` (normal float, QLoRA's choice) or ``"fp4"``.
        double_quant: 4-bit only: quantise the per-block scales too (about 0.4 bit per weight less).
        compute_dtype: 4-bit only: dtype of the base layer's matmul, ``"float32"``, ``"bfloat16"`` or
            ``"float16"``; inputs are cast to it and outputs back to the input dtype.
        int8_threshold: 8-bit only: LLM.int8() outlier threshold for inputs (bitsandbytes' default 6.0; 0 turns
            outlier handling off).
        layers: Which layers to quantise: ``"targets"`` (the ``nn.Linear`` layers that get adapters) or
            ``"all-linear"`` (every ``nn.Linear`` except the output head and ``modules_to_save``). Other layer kinds
            (embeddings, convolutions, Hugging Face ``Conv1D``) stay in full precision.
        storage_dtype: 4-bit only: the dtype the packed 4-bit bytes are stored as (bitsandbytes' ``quant_storage``).
            ``"uint8"`` shards under FSDP2 with any mixed precision; FSDP1 and DeepSpeed ZeRO-3 flatten a unit's
            parameters into one tensor of one dtype, so they need the dtype of the model's other parameters.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    int8_threshold: float = 6.0
    layers: Literal["targets", "all-linear"] = "targets"
    storage_dtype: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"

    def __post_init__(self) -> None:
        choices = {
            "bits": (4, 8),
            "quant_type": ("nf4", "fp4"),
            "compute_dtype": ("float32", "bfloat16", "float16"),
            "layers": ("targets", ALL_LINEAR),
            "storage_dtype": ("uint8", "float32", "bfloat16", "float16"),
        }
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid or isinstance(value, bool):
                raise ValueError(f"quantization.{name} must be one of {valid}, got {value!r}.")
        if not (is_finite_number(self.int8_threshold) and self.int8_threshold >= 0):
            raise ValueError(
                f"quantization.int8_threshold must be a finite number >= 0, got {self.int8_threshold!r}; "
                "bitsandbytes' default is 6.0, and 0 turns outlier handling off."
            )
        self.int8_threshold = float(self.int8_threshold)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantizationConfig:
        """Build from a plain dict; unknown keys are an error naming them."""
        return config_from_dict(cls, values, "QuantizationConfig")

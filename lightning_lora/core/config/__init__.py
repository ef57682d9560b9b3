"""What users configure: adapter configs (every kind's options), quantisation and EVA options, init names.

``lightning_lora.core.config`` was one module; its names stay importable from here (configs pickled into
checkpoints record this path).
"""

from lightning_lora.core.config.lora_config import (  # noqa: F401
    ALL_LINEAR,
    BIAS_MODES,
    AdapterConfig,
    EvaConfig,
    LoraConfig,
    LowRankConfig,
    QuantizationConfig,
    check_dropout,
    pattern_matches,
)

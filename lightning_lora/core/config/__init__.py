"""What users configure: adapter configs (every kind's options), quantisation and EVA options, init names.

``lightning_lora.core.config`` was one module; its names stay importable from here (configs pickled into
checkpoints record this path).
"""

from lightning_lora.core.config.adapter_config import AdapterConfig, LowRankConfig  # noqa: F401
from lightning_lora.core.config.fields import ALL_LINEAR, BIAS_MODES, check_dropout, pattern_matches  # noqa: F401
from lightning_lora.core.config.lora_config import EvaConfig, LoraConfig  # noqa: F401
from lightning_lora.core.config.quantization_config import QuantizationConfig  # noqa: F401

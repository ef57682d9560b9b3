"""The pure-PyTorch core of lightning_lora: no Lightning import anywhere below this package.

Every function here works on a plain ``nn.Module`` in a plain training loop. The sub-packages, from the bottom up:
``common``, ``config``, ``layers``, ``targets``, ``quantization``, ``inits``, ``kinds``, ``surgery``, ``training``,
``files``, ``composition`` (docs/architecture.md draws them).
"""

from lightning_lora.core import legacy_paths

legacy_paths.install()


from lightning_lora.core.composition.combine import add_weighted_adapter
from lightning_lora.core.composition.mixed_batch import mixed_adapter_batch
from lightning_lora.core.composition.xlora import add_xlora, remove_xlora, xlora_scalings
from lightning_lora.core.composition.xlora_classifier import XLoraConfig
from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.config.quantization_config import QuantizationConfig
from lightning_lora.core.files.adapter_files import load_adapter, read_adapter_config, save_adapter
from lightning_lora.core.files.merged_export import load_merged_state_dict, save_merged_model
from lightning_lora.core.files.peft_export import peft_adapter_state
from lightning_lora.core.files.peft_format import lora_config_from_peft
from lightning_lora.core.files.state import adapter_state_dict, load_adapter_state_dict
from lightning_lora.core.inits.loftq import loftq_init
from lightning_lora.core.inits.svd_init import apply_init_residual, restore_base_weight
from lightning_lora.core.kinds import (
    KINDS,
    AdaLoraConfig,
    AdapterKind,
    BOFTConfig,
    LoHaConfig,
    LoKrConfig,
    OFTConfig,
    VBLoRAConfig,
    VeraConfig,
)
from lightning_lora.core.kinds.nested_rank import active_rank, set_active_rank, truncate_adapter
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import (
    adapter_names,
    get_lora_config,
    mark_only_adapters_trainable,
    set_active_adapters,
)
from lightning_lora.core.layers.adapter_tensors import register_zero3_external_parameters
from lightning_lora.core.layers.summary import TrainableSummary, trainable_parameters_summary
from lightning_lora.core.quantization.kbit_training import enable_input_gradients, prepare_for_kbit_training
from lightning_lora.core.quantization.quantize import dequantize_model
from lightning_lora.core.quantization.quantized_weights import keep_training_layout, quantized_layers
from lightning_lora.core.surgery.inject import apply_lora, initialize_pending_adapters
from lightning_lora.core.surgery.merge import disable_adapters, merge_and_unload, merge_lora, unload_lora, unmerge_lora
from lightning_lora.core.surgery.removal import delete_adapter
from lightning_lora.core.training.lorafa import LoraFAOptimizer, lorafa_optimizer
from lightning_lora.core.training.param_groups import freeze_lora_A, lora_param_groups

__all__ = [
    "KINDS",
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterKind",
    "BOFTConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LoraFAOptimizer",
    "OFTConfig",
    "LoraLayer",
    "QuantizationConfig",
    "TrainableSummary",
    "VBLoRAConfig",
    "VeraConfig",
    "XLoraConfig",
    "active_rank",
    "adapter_names",
    "adapter_state_dict",
    "add_weighted_adapter",
    "add_xlora",
    "apply_init_residual",
    "apply_lora",
    "delete_adapter",
    "dequantize_model",
    "disable_adapters",
    "enable_input_gradients",
    "freeze_lora_A",
    "get_lora_config",
    "initialize_pending_adapters",
    "keep_training_layout",
    "load_adapter",
    "load_adapter_state_dict",
    "load_merged_state_dict",
    "loftq_init",
    "lora_config_from_peft",
    "lora_layers",
    "lora_param_groups",
    "lorafa_optimizer",
    "mark_only_adapters_trainable",
    "register_zero3_external_parameters",
    "restore_base_weight",
    "merge_and_unload",
    "merge_lora",
    "mixed_adapter_batch",
    "peft_adapter_state",
    "prepare_for_kbit_training",
    "quantized_layers",
    "read_adapter_config",
    "remove_xlora",
    "save_adapter",
    "save_merged_model",
    "set_active_adapters",
    "set_active_rank",
    "trainable_parameters_summary",
    "truncate_adapter",
    "unload_lora",
    "unmerge_lora",
    "xlora_scalings",
]

# Data-driven inits (CorDA, EVA): importing the module registers init="corda_ipm", "corda_kpm" and "eva".
from lightning_lora.core.config.lora_config import EvaConfig  # noqa: E402
from lightning_lora.core.surgery.calibration import calibrate_adapters  # noqa: E402

__all__ += ["EvaConfig", "calibrate_adapters"]

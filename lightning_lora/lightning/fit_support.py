"""What the Lightning layer's callbacks share beneath them: the module they adapt, the check that the optimizer holds
what trains, merged-weight writes and in-place edits per strategy (FSDP1 gathers and unshards through FSDP itself)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from lightning_lora.core.distributed import barrier, clean_name, reshard_fsdp2
from lightning_lora.core.merged_export import SINGLE_FILE_NAME, save_merged_model
from lightning_lora.core.safe_files import is_writer, write_safetensors
from lightning_lora.lightning.checkpoint import is_adapter_key


def submodule_of(pl_module: nn.Module, path: Optional[str]) -> Optional[nn.Module]:
    """The module at attribute ``path`` (``"model.encoder"``) of ``pl_module`` (itself for None), or None while it
    does not exist."""
    module: Any = pl_module
    for attribute in path.split(".") if path else ():
        module = getattr(module, attribute, None)
    return module if isinstance(module, nn.Module) else None


def check_optimizer_holds_trainable_parameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise when the optimizers miss a trainable parameter of ``pl_module`` or hold a frozen one.

    Raises:
        ValueError: With the parameters concerned and how to build the optimizer instead.
    """
    if not trainer.optimizers or isinstance(trainer.strategy, DeepSpeedStrategy):
        return  # DeepSpeed's optimizer holds flattened copies, not the module's parameters
    held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
    missing, frozen = [], []
    for name, parameter in pl_module.named_parameters():
        if parameter.requires_grad and id(parameter) not in held:
            missing.append(clean_name(name))
        elif not parameter.requires_grad and id(parameter) in held:
            frozen.append(clean_name(name))
    if not missing and not frozen:
        return
    problems = []
    if missing:
        problems.append(f"misses {len(missing)} trainable tensor(s), e.g. {missing[:3]}")
    if frozen:
        problems.append(f"holds {len(frozen)} frozen tensor(s), e.g. {frozen[:3]}")
    raise ValueError(
        "The optimizer does not match the LoRA training setup: it " + " and ".join(problems) + ". It was built "
        "from parameters collected before the adapters were added (LightningCLI's automatic optimizer does that), or "
        "from all parameters. Build it in configure_optimizers from the trainable parameters, e.g. "
        "torch.optim.AdamW(lightning_lora.lora_param_groups(self, lr=1e-4)); with LightningCLI use "
        "auto_configure_optimizers=False and an `optimizer: OptimizerCallable` module argument (LoraMixin has one). "
        "To skip this check: LoraCallback(check_optimizer=False)."
    )


def write_merged_weights(
    trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, directory: Path, adapter_name: str
) -> Path:
    """Write ``target`` with ``adapter_name`` merged (already merged in place, or merged now from copies) to
    ``directory`` as a merged export (``model.safetensors``, or shards with an index; ``config.json`` for Hugging
    Face models), from rank 0. Sharded tensors are gathered first, so every rank takes part.

    Returns:
        The directory.
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        reshard_fsdp2(target)
        return save_merged_model(target, directory, adapter_names=[adapter_name])
    # FSDP1 flattens parameters: gather the full state dict on rank 0 through FSDP itself.
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, config):
        state = trainer.strategy.model.state_dict()
    name = next(clean_name(name) for name, module in pl_module.named_modules() if module is target)
    prefix = f"{name}." if name else ""
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not is_adapter_key(k)}
    if is_writer():
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / SINGLE_FILE_NAME, state)
    barrier()
    return directory


@contextmanager
def full_parameters_of(strategy: Any) -> Iterator[None]:
    """Under FSDP1, unshard every parameter for in-place edits (written back on exit); elsewhere a no-op."""
    if not isinstance(strategy, FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(strategy.model, writeback=True):
        yield


def is_zero3(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3

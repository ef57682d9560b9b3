"""What the Lightning layer's callbacks share beneath them: the module they adapt, the check that the optimizer holds
what trains, merged-weight writes and in-place edits per strategy (FSDP1 gathers and unshards through FSDP itself)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_lora.core.common.distributed import barrier, clean_name, reshard_fsdp2
from lightning_lora.core.common.safe_files import PathLike, check_writable_directory, is_writer, write_safetensors
from lightning_lora.core.files.merged_export import SINGLE_FILE_NAME, save_merged_model
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.surgery.merge import merge_lora, unmerge_lora
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
    trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, directory: Path
) -> Path:
    """Write ``target`` as it computes now, every active adapter merged (those merged in place, the others merged
    from copies: O-LoRA's earlier tasks too), to ``directory`` as a merged export (``model.safetensors``, or shards
    with an index; ``config.json`` for Hugging Face models), from rank 0. Sharded tensors are gathered first, so every
    rank takes part. Under FSDP1 the in-place merged state is written as FSDP gathers it.

    Returns:
        The directory.
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        reshard_fsdp2(target)
        return save_merged_model(target, directory)  # every active adapter: the model as it computes now
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


def refresh_optimizer_copies(strategy: Any) -> None:
    """Make an optimizer's own copies of the parameters match them again after they were written in place.

    DeepSpeed's ZeRO (stages 1-3) and its mixed-precision optimizers take full-precision copies of the trainable
    tensors at ``deepspeed.initialize`` and write them back into the model at every step, so an init that runs later
    (SVD inits and data-driven inits run at fit or train start, after the strategy's setup) would be undone by the
    first step. Elsewhere a no-op: DDP and FSDP1/FSDP2 optimizers hold the parameters themselves (FSDP's mixed
    precision casts a fresh low-precision copy from them at every all-gather).

    Args:
        strategy: The Trainer's strategy.
    """
    if not isinstance(strategy, DeepSpeedStrategy) or getattr(strategy, "deepspeed_engine", None) is None:
        return
    refresh = getattr(strategy.deepspeed_engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # absent for a plain torch optimizer without ZeRO: it holds the parameters themselves
        refresh()


def check_writable_destination(path: Optional[PathLike], what: str, trainer: Optional[pl.Trainer] = None) -> None:
    """Refuse, before training, a folder that a save at the end of the run could not write.

    The folder must be a directory or creatable, and accept new files where the save writes (see
    :func:`~lightning_lora.core.common.safe_files.check_writable_directory`; tested with a probe file that is deleted
    again). Only the process that writes (global rank 0) looks at the disk; with a ``trainer`` its answer is
    broadcast, so every rank raises together.

    Args:
        path: The folder as the user gave it; None checks nothing.
        what: The argument that named it, for the message (``"LoraCallback(merged_weights_dir=...)"``).
        trainer: The running Trainer (for distributed runs).

    Raises:
        ValueError: The folder cannot be written; the message names ``path``.
    """
    if path is None:
        return
    problem = None
    if is_writer():
        try:
            check_writable_directory(path, what)
        except ValueError as err:
            problem = str(err)
    if trainer is not None and trainer.world_size > 1:
        problem = trainer.strategy.broadcast(problem, src=0)
    if problem:
        raise ValueError(f"{problem} Nothing was trained.")


def is_zero3(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def is_merged_into(target: Optional[nn.Module], adapter_name: str) -> bool:
    """Whether ``adapter_name`` is merged into any layer of ``target``."""
    layers = lora_layers(target) if target is not None else []
    return any(adapter_name in layer.merged_adapters for _, layer in layers)


def unmerge_after_last_fit(target: nn.Module, adapter_name: str) -> None:
    """Unmerge what ``merge_on_fit_end`` merged at the end of the last fit, saying so."""
    rank_zero_info(f"Unmerging LoRA adapter {adapter_name!r} (merged at the end of the last fit).")
    unmerge_lora(target)


def merge_at_fit_end(
    pl_module: pl.LightningModule, target: nn.Module, adapter_name: str, merged_weights_dir: Optional[PathLike]
) -> None:
    """``merge_on_fit_end``: merge the adapter into the base weights in place (full parameters under sharded
    strategies) and, given ``merged_weights_dir``, write the merged weights there."""
    trainer = pl_module.trainer
    with full_parameters_of(trainer.strategy):
        reshard_fsdp2(target)
        merge_lora(target, adapter_names=[adapter_name])
        reshard_fsdp2(target)
    rank_zero_info(f"Merged LoRA adapter {adapter_name!r} into the base weights.")
    if merged_weights_dir is not None:
        path = write_merged_weights(trainer, pl_module, target, merged_weights_dir)
        rank_zero_info(f"Wrote the merged weights to {path}.")

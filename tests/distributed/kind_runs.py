"""Two-process Lightning runs for tests/test_kinds_distributed.py: LoHa, LoKr, OFT, BOFT, VeRA, VB-LoRA, AdaLoRA and
DoRA adapters, LoRA under ReLoRA, LoRA with activation checkpointing, and LoRA and DoRA on a 4-bit base (QLoRA; FSDP2
shards the packed 4-bit weights: FSDP-QLoRA), with DDP and FSDP2 (ModelParallelStrategy) on CPU with gloo. Lightning
re-launches this script for rank 1.

    python kind_runs.py OUT_DIR

For each ``<kind>-<strategy>`` it writes ``<name>-uninterrupted-rank<r>.pt`` (two epochs) and
``<name>-resumed-rank<r>.pt`` (one epoch, adapter-only checkpoint, a new Trainer and module, one more epoch): the
full adapter tensors and adapted base weights as rank ``r`` holds them; runs on a 4-bit base also write the merged
model, dequantised and gathered from the shards, to ``<name>-merged``. Each rank reads its half of every batch in order
(``DistributedSampler(shuffle=False)``, ``use_distributed_sampler=False``), so one process on whole batches is the
reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_models import BuiltInInit, ShardedBuiltInInit, dataloader, exit_cleanly, trainer_arguments
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_lora import (
    AdaLoraConfig,
    AdaLoraSchedule,
    AdapterConfig,
    BOFTConfig,
    LoHaConfig,
    LoKrConfig,
    LoraCallback,
    LoraConfig,
    OFTConfig,
    QuantizationConfig,
    ReLoraSchedule,
    VBLoRAConfig,
    VeraConfig,
    adapter_state_dict,
    save_merged_model,
)
from lightning_lora.core.common.distributed import full_tensor
from lightning_lora.core.quantization.quantize import quantization_fits

EPOCHS = 2
BATCH_PER_RANK = 2
CONFIGS: dict[str, AdapterConfig] = {
    "loha": LoHaConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
    "lokr": LoKrConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"], init_weights="lycoris"),
    "oft": OFTConfig(oft_block_size=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
    "boft": BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["fc1", "fc2"],
                       modules_to_save=["head"]),
    "vera": VeraConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),  # projections shared by layers
    # a trained vector bank shared by both layers (held by the model, FSDP2's root unit)
    "vblora": VBLoRAConfig(r=2, num_vectors=8, vector_length=4, target_modules=["fc1", "fc2"],
                           modules_to_save=["head"]),
    # total_step fixed: the stopped run (one epoch, standing in for a kill) must follow the 8-step schedule too
    "adalora": AdaLoraConfig(init_r=4, target_r=2, alpha=8, tinit=1, tfinal=2, delta_t=1, total_step=8,
                             target_modules=["fc1", "fc2"], modules_to_save=["head"]),
    "relora": LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
    "dora": LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
    # LoRA with the adapted layers recomputed in backward (activation checkpointing, CheckpointedInit)
    "lora-checkpointed": LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
}
# QLoRA where the installed bitsandbytes CPU kernel computes these layers' 4-bit weights right (not on AVX512-BF16)
QLORA = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True)
if quantization_fits(QLORA, [8, 16]):
    for name, dora in (("qlora", False), ("dora-qlora", True)):
        CONFIGS[name] = LoraConfig(r=2, alpha=4, use_dora=dora, target_modules=["fc1", "fc2"],
                                   modules_to_save=["head"], quantization=QLORA)
# Strategies each configuration runs with (default: both)
STRATEGIES: dict[str, tuple[str, ...]] = {"dora-qlora": ("fsdp2",)}
# Schedules that change the adapter (and ReLoRA the base) while training: 8 steps, so AdaLoRA re-allocates at
# steps 2-5 and finalises at 6, and ReLoRA restarts after steps 3 and 6 (one restart before the resume point).
SCHEDULES: dict[str, Any] = {
    "adalora": lambda: AdaLoraSchedule(heatmap=False),
    "relora": lambda: ReLoraSchedule(restart_every=3, restart_warmup_steps=1, optimizer_pruning=0.5),
}


class CheckpointedInit(BuiltInInit):
    """BuiltInInit whose adapted layers are recomputed in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.model.checkpointed = True


class ShardedCheckpointedInit(CheckpointedInit, ShardedBuiltInInit):
    """The same, sharded with FSDP2."""


# (one process and DDP, FSDP2) module classes of a kind
MODULES: dict[str, tuple[type, type]] = {"lora-checkpointed": (CheckpointedInit, ShardedCheckpointedInit)}


def module_classes(kind: str) -> tuple[type, type]:
    return MODULES.get(kind, (BuiltInInit, ShardedBuiltInInit))


def callbacks_of(kind: str) -> list[L.Callback]:
    """The seeding callback, the adapter and the kind's schedule, if any."""
    schedule = SCHEDULES.get(kind)
    return [SeedBeforeInjection(), LoraCallback(CONFIGS[kind]), *([schedule()] if schedule else [])]


class SeedBeforeInjection(L.Callback):
    """Listed before the LoraCallback: the adapter's random init draws the same numbers in every run, whatever the
    launcher and strategy consumed from the generator before."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.manual_seed(1)


class RankedData(L.LightningDataModule):
    """Each rank's half of every global batch, in order (the sampler is built once the process group exists)."""

    def train_dataloader(self) -> DataLoader:
        data = dataloader().dataset
        return DataLoader(data, batch_size=BATCH_PER_RANK, sampler=DistributedSampler(data, shuffle=False))


def fit(module: L.LightningModule, kind: str, strategy: Any, epochs: int, checkpoint_dir: Optional[Path] = None,
        ckpt_path: Optional[Path] = None) -> int:
    callbacks = callbacks_of(kind)
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="epoch{epoch}", save_top_k=-1))
    trainer = L.Trainer(**trainer_arguments(devices=2, strategy=strategy, max_epochs=epochs, callbacks=callbacks,
                                            enable_checkpointing=checkpoint_dir is not None,
                                            use_distributed_sampler=False))
    trainer.fit(module, datamodule=RankedData(), ckpt_path=ckpt_path)
    return trainer.global_rank


def snapshot(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The adapter and the base weights of the adapted layers (ReLoRA moves those)."""
    tensors = {**adapter_state_dict(module), "model.fc1.weight": module.model.fc1.weight,
               "model.fc2.weight": module.model.fc2.weight}
    return {k: full_tensor(v.detach()).cpu().clone() for k, v in tensors.items()}


def runs(out: Path, kind: str, name: str, module_class: type, strategy: Any) -> None:
    L.seed_everything(0)
    module = module_class()
    rank = fit(module, kind, strategy(), EPOCHS)
    torch.save(snapshot(module), out / f"{kind}-{name}-uninterrupted-rank{rank}.pt")
    checkpoints = out / f"{kind}-{name}-checkpoints"
    L.seed_everything(0)
    fit(module_class(), kind, strategy(), 1, checkpoint_dir=checkpoints)
    L.seed_everything(0)
    module = module_class()
    fit(module, kind, strategy(), EPOCHS, ckpt_path=checkpoints / "epochepoch=0.ckpt")
    torch.save(snapshot(module), out / f"{kind}-{name}-resumed-rank{rank}.pt")
    if CONFIGS[kind].quantization is not None:
        save_merged_model(module.model, out / f"{kind}-{name}-merged", dequantize=True)  # every rank takes part


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    fsdp2 = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # noqa: E731
    for kind in CONFIGS:
        plain, sharded = module_classes(kind)
        strategies = STRATEGIES.get(kind, ("ddp", "fsdp2"))
        if "ddp" in strategies:
            runs(out, kind, "ddp", plain, lambda: "ddp")
        if "fsdp2" in strategies:
            runs(out, kind, "fsdp2", sharded, fsdp2)


if __name__ == "__main__":
    main()
    exit_cleanly()

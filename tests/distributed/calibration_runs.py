"""Two-process Lightning runs for tests/test_calibration_lightning.py: a CorDA adapter calibrated through
``LoraCallback(calibration_batches=N)`` under DDP and FSDP2 (ModelParallelStrategy) on CPU with gloo. Each rank reads
its own batches from a ``DistributedSampler(shuffle=False)`` (``use_distributed_sampler=False``: Lightning's own
sampler shuffles), so together the ranks see what one process sees with twice the batch size
(:func:`run_single_process`). Lightning re-launches this script for rank 1.

    python calibration_runs.py OUT_DIR

For each ``<kind>`` (``ddp``, ``fsdp2``; and ``fsdp2_eva``, EVA with ``rho=1.0``, without a resume) it writes
``<kind>-<run>-rank<r>.pt`` for the runs ``calibrated`` (the state at train start, right after calibration),
``uninterrupted`` (two epochs) and ``resumed`` (one epoch, checkpoint, a new Trainer and module, one more epoch,
with CorDA's statistics collection made to fail), each ``{"adapter": full adapter tensors, "weights": full base
weights of the adapted layers}`` as rank ``r`` holds them.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_models import (
    BuiltInInit,
    ShardedBuiltInInit,
    dataloader,
    exit_cleanly,
    lora_config,
    trainer_arguments,
)
from torch.utils.data import DataLoader, DistributedSampler

import lightning_lora.core.inits.corda as corda
from lightning_lora import EvaConfig, LoraCallback, adapter_state_dict
from lightning_lora.core.common.distributed import full_tensor

KINDS = ["ddp", "fsdp2"]
INIT = "corda_kpm"
EVA = {"init": "eva", "eva_config": EvaConfig(rho=1.0)}  # under FSDP2 EVA keeps the ranks (shards cannot resize)
EPOCHS = 2
CALIBRATION_BATCHES = 2
BATCH_PER_RANK = 4
ADAPTED = ("fc1", "fc2")


def snapshot(module: L.LightningModule) -> dict[str, Any]:
    """Full CPU copies of the adapter tensors and of the adapted layers' base weights (FSDP2 shards gathered)."""
    weights = {f"model.{name}.weight": getattr(module.model, name).weight for name in ADAPTED}
    return {key: {k: full_tensor(v.detach()).cpu().clone() for k, v in state.items()}
            for key, state in (("adapter", adapter_state_dict(module)), ("weights", weights))}  # fmt: skip


class SnapshotAtTrainStart(Callback):
    """The state right after LoraCallback's calibration (it runs first: it is earlier in the callback list)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = snapshot(pl_module)


def fit(module: L.LightningModule, data: Any, epochs: int, probe: Optional[Callback] = None,
        checkpoint_dir: Optional[Path] = None, ckpt_path: Optional[Path] = None, eva: bool = False,
        **trainer_overrides: Any) -> int:
    """Fit (``data``: a DataLoader or a LightningDataModule) and return this process's global rank."""
    config = lora_config(**EVA) if eva else lora_config(init=INIT)
    callbacks: list = [LoraCallback(config, calibration_batches=CALIBRATION_BATCHES)]
    callbacks += [probe] if probe is not None else []
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="e{epoch}", save_top_k=-1))
    trainer = L.Trainer(**trainer_arguments(max_epochs=epochs, callbacks=callbacks,
                                            enable_checkpointing=checkpoint_dir is not None, **trainer_overrides))
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer.global_rank


def run_single_process(eva: bool = False) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """One process whose every batch holds the samples of both ranks' batches of that step."""
    L.seed_everything(0)
    probe = SnapshotAtTrainStart()
    module = BuiltInInit()
    fit(module, dataloader(batch_size=2 * BATCH_PER_RANK), EPOCHS, probe, eva=eva)
    return {"calibrated": probe.state, "uninterrupted": snapshot(module)}


class RankData(L.LightningDataModule):
    """Each rank's own half of the samples, in order: ``DistributedSampler(shuffle=False)``."""

    def train_dataloader(self) -> DataLoader:
        data = dataloader(batch_size=BATCH_PER_RANK)
        sampler = DistributedSampler(data.dataset, num_replicas=2, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data.dataset, batch_size=BATCH_PER_RANK, sampler=sampler)


@contextmanager
def calibration_forbidden() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("CorDA calibrated again while resuming")

    original = corda.CovarianceCollector.add
    corda.CovarianceCollector.add = refuse
    try:
        yield
    finally:
        corda.CovarianceCollector.add = original


def runs(out: Path, kind: str, module_class: type, strategy: Any) -> None:
    def arguments() -> dict[str, Any]:
        return {"devices": 2, "use_distributed_sampler": False, "strategy": strategy()}

    L.seed_everything(0)
    probe, module = SnapshotAtTrainStart(), module_class()
    rank = fit(module, RankData(), EPOCHS, probe, **arguments())
    torch.save(probe.state, out / f"{kind}-calibrated-rank{rank}.pt")
    torch.save(snapshot(module), out / f"{kind}-uninterrupted-rank{rank}.pt")

    checkpoints = out / f"{kind}-checkpoints"
    L.seed_everything(0)
    fit(module_class(), RankData(), 1, checkpoint_dir=checkpoints, **arguments())
    L.seed_everything(0)
    module = module_class()
    with calibration_forbidden():
        fit(module, RankData(), EPOCHS, ckpt_path=checkpoints / "eepoch=0.ckpt", **arguments())
    torch.save(snapshot(module), out / f"{kind}-resumed-rank{rank}.pt")


def main() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    runs(out, "ddp", BuiltInInit, lambda: "ddp")
    fsdp2 = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # noqa: E731
    runs(out, "fsdp2", ShardedBuiltInInit, fsdp2)
    L.seed_everything(0)
    probe, module = SnapshotAtTrainStart(), ShardedBuiltInInit()
    rank = fit(module, RankData(), EPOCHS, probe, eva=True, devices=2, use_distributed_sampler=False, strategy=fsdp2())
    torch.save(probe.state, out / f"fsdp2_eva-calibrated-rank{rank}.pt")
    torch.save(snapshot(module), out / f"fsdp2_eva-uninterrupted-rank{rank}.pt")


if __name__ == "__main__":
    main()
    exit_cleanly()

"""Checkpoint sizes of the schedules that move base weights, beside plain LoRA and a full checkpoint.

The model of the checkpoint tests (4 x ``Linear(256, 256)``, LoRA r=2 on all four, AdamW), 8 optimizer steps;
ReLoRA restarts every 2 steps (4 restarts folded). Writes ``results/schedule_checkpoints.json``.

    python benchmarks/schedule_checkpoints.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import DeltaLoraSchedule, LoraCallback, LoraConfig, ReLoraSchedule, lora_param_groups

STEPS = 8


class Stack(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=1e-3))


def checkpoint_bytes(schedule: Optional[L.Callback], adapter_only: bool = True) -> int:
    L.seed_everything(0)
    data = TensorDataset(torch.randn(4 * STEPS, 256), torch.randn(4 * STEPS, 256))
    config = LoraConfig(r=2, alpha=4, target_modules=["0", "1", "2", "3"])
    with tempfile.TemporaryDirectory() as directory:
        callbacks = [LoraCallback(config, adapter_only_checkpoints=adapter_only), ModelCheckpoint(dirpath=directory)]
        callbacks += [schedule] if schedule is not None else []
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)
        trainer.fit(Stack(), DataLoader(data, batch_size=4))
        return sum(path.stat().st_size for path in Path(directory).glob("*.ckpt"))


def main() -> None:
    results = {
        "lora": checkpoint_bytes(None),
        "relora_4_restarts": checkpoint_bytes(ReLoraSchedule(restart_every=2, restart_warmup_steps=1)),
        "delta_lora": checkpoint_bytes(DeltaLoraSchedule()),
        "full_checkpoint": checkpoint_bytes(None, adapter_only=False),
    }
    out = Path(__file__).parent / "results" / "schedule_checkpoints.json"
    out.write_text(json.dumps({"model": "4 x Linear(256, 256), LoRA r=2, AdamW, 8 steps", "bytes": results}, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

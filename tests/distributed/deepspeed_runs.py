"""Two-process DeepSpeed runs on CPU (gloo) for tests/test_deepspeed_cpu.py, through the real ``LoraCallback`` and
a test-only strategy (``cpu_deepspeed.py``: Lightning's refuses CPU). Lightning re-launches this script for rank 1.

    python deepspeed_runs.py OUT_DIR

Each run ``<name>`` writes ``<name>-rank<r>.pt``: ``{"adapter", "weights"}`` (full CPU copies, ZeRO-3 partitions
gathered, as in svd_init_runs.snapshot) and ``"summary"`` (the trainable-parameter line the callback prints).
Checkpoints stay under ``<name>-checkpoints/``; the merged exports under ``<name>-merged/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L  # noqa: E402
import torch  # noqa: E402
from cpu_deepspeed import CpuDeepSpeedStrategy  # first: it sets DS_ACCELERATOR before deepspeed is imported
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning_models import (  # noqa
    BuiltInConfigureModel,
    BuiltInInit,
    dataloader,
    exit_cleanly,
    lora_config,
    trainer_arguments,
)
from svd_init_runs import snapshot  # noqa: E402

from lightning_lora import LoraCallback, VBLoRAConfig, save_merged_model, trainable_parameters_summary  # noqa: E402
from lightning_lora.core.common.distributed import gathered_parameters  # noqa: E402

EPOCHS = 2
# (name, ZeRO stage, init, module): every SVD init under ZeRO-3, the common ones under ZeRO-2, and a model built in
# configure_model (inside DeepSpeed's zero.Init: adapters partitioned as they are created).
TRAINED = [
    ("zero3-pissa", 3, "pissa", BuiltInInit),
    ("zero3-pissa_niter_2", 3, "pissa_niter_2", BuiltInInit),
    ("zero3-milora", 3, "milora", BuiltInInit),
    ("zero3-olora", 3, "olora", BuiltInInit),
    ("zero3-gaussian", 3, "gaussian", BuiltInInit),
    ("zero3-pissa-configure_model", 3, "pissa", BuiltInConfigureModel),
    ("zero2-pissa", 2, "pissa", BuiltInInit),
    ("zero2-olora", 2, "olora", BuiltInInit),
]
RESUMED = [("zero3-pissa", 3, "pissa"), ("zero2-pissa", 2, "pissa")]


class InitialAdapter(L.Callback):
    """Keeps a gathered copy of the adapter as training starts."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.adapter = snapshot(pl_module)["adapter"]


def fit(module: L.LightningModule, stage: int, init: str, epochs: int, callbacks: Optional[list] = None,
        ckpt_path: Optional[Path] = None, **lora_options: Any) -> L.Trainer:
    lora = LoraCallback(lora_config(init=init), **lora_options)
    trainer = L.Trainer(**trainer_arguments(
        accelerator="cpu", devices=2, strategy=CpuDeepSpeedStrategy(stage=stage), max_epochs=epochs,
        callbacks=[lora, *(callbacks or [])], enable_checkpointing=bool(callbacks)))
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return trainer


def save(out: Path, name: str, module: L.LightningModule, trainer: L.Trainer) -> None:
    result = snapshot(module)
    with gathered_parameters(module):
        result["summary"] = str(trainable_parameters_summary(module))
    torch.save(result, out / f"{name}-rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    for name, stage, init, module_class in TRAINED:
        L.seed_everything(0)
        module = module_class()
        save(out, name, module, fit(module, stage, init, EPOCHS))
    for name, stage, init in RESUMED:
        checkpoints = out / f"{name}-checkpoints"
        L.seed_everything(0)
        fit(BuiltInInit(), stage, init, 1, callbacks=[ModelCheckpoint(dirpath=checkpoints, filename="epoch{epoch}")])
        L.seed_everything(0)
        module = BuiltInInit()
        trainer = fit(module, stage, init, EPOCHS, ckpt_path=checkpoints / "epochepoch=0.ckpt")
        save(out, f"{name}-resumed", module, trainer)
    # Merged exports: ZeRO-2 merges in place at fit end; ZeRO-3 (merge_on_fit_end refused: partitioned base) writes a
    # merged copy with save_merged_model inside a gather, every rank taking part.
    L.seed_everything(0)
    module = BuiltInInit()
    fit(module, 2, "pissa", EPOCHS, merge_on_fit_end=True, merged_weights_dir=out / "zero2-pissa-merged")
    L.seed_everything(0)
    module = BuiltInInit()
    fit(module, 3, "pissa", EPOCHS)
    with gathered_parameters(module):
        save_merged_model(module, out / "zero3-pissa-merged")
    # VB-LoRA: one trained vector bank on the root module, shared by both adapted layers, partitioned by ZeRO-3.
    L.seed_everything(0)
    module = BuiltInInit()
    bank = LoraCallback(VBLoRAConfig(r=2, num_vectors=8, vector_length=4, target_modules=["fc1", "fc2"]))
    initial = InitialAdapter()
    trainer = L.Trainer(**trainer_arguments(
        accelerator="cpu", devices=2, strategy=CpuDeepSpeedStrategy(stage=3), max_epochs=EPOCHS,
        callbacks=[bank, initial], enable_checkpointing=False))
    trainer.fit(module, dataloader())
    torch.save({**snapshot(module), "initial": initial.adapter}, out / f"zero3-vblora-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
    exit_cleanly()

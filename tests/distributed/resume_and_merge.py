"""Two-process CPU runs for tests/test_distributed.py: exact resume from adapter-only checkpoints, and merge on fit
end, under DDP or FSDP2 (ModelParallelStrategy). Lightning re-launches this script for rank 1.

    python resume_and_merge.py {ddp|fsdp2} OUT_DIR

Writes to OUT_DIR (rank 0): ``<run>.pt`` with the final adapter tensors of each run, ``merge.pt`` with outputs of
the merged and unmerged model, the checkpoints, and ``merged_*/model.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_models import (
    BuiltInInit,
    ShardedBuiltInInit,
    ShardedMixinBuiltInConfigureModel,
    dataloader,
    lora_config,
    probe_inputs,
    trainer_arguments,
)

from lightning_lora import LoraCallback, adapter_state_dict, unmerge_lora
from lightning_lora.core.distributed import gather_full_state_dict, global_rank, reshard_fsdp2

EPOCHS = 2  # 4 steps each; the interrupted runs stop after the first epoch


def strategy_for(kind: str, distributed_checkpoint: bool = True) -> Any:
    if kind == "ddp":
        return "ddp"
    return ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed_checkpoint
    )


def fit(
    module: L.LightningModule,
    strategy: Any,
    epochs: int,
    callbacks: list,
    checkpoint_dir: Optional[Path] = None,
    ckpt_path: Optional[Path] = None,
) -> L.Trainer:
    if checkpoint_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=checkpoint_dir, filename="epoch{epoch}", save_top_k=-1)]
    trainer = L.Trainer(
        **trainer_arguments(
            devices=2,
            strategy=strategy,
            max_epochs=epochs,
            callbacks=callbacks,
            enable_checkpointing=checkpoint_dir is not None,
        )
    )
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return trainer


def save_adapter(module: L.LightningModule, path: Path) -> None:
    state = gather_full_state_dict(adapter_state_dict(module))  # every rank takes part in the gather
    if global_rank() == 0:
        torch.save(state, path)


def uninterrupted_and_resumed(kind: str, out: Path, name: str, make: Any, distributed_checkpoint: bool = True) -> None:
    """``name``-uninterrupted: 2 epochs; ``name``-resumed: 1 epoch, checkpoint, new Trainer and module, 1 more."""
    L.seed_everything(0)
    module, callbacks = make()
    fit(module, strategy_for(kind, distributed_checkpoint), EPOCHS, callbacks)
    save_adapter(module, out / f"{name}-uninterrupted.pt")

    L.seed_everything(0)
    module, callbacks = make()
    fit(module, strategy_for(kind, distributed_checkpoint), 1, callbacks, checkpoint_dir=out / f"{name}-checkpoints")
    L.seed_everything(0)
    module, callbacks = make()
    checkpoint = out / f"{name}-checkpoints" / "epochepoch=0.ckpt"
    fit(module, strategy_for(kind, distributed_checkpoint), EPOCHS, callbacks, ckpt_path=checkpoint)
    save_adapter(module, out / f"{name}-resumed.pt")


def merge_on_fit_end(kind: str, out: Path) -> None:
    """Train with merge_on_fit_end, then compare the merged model's outputs with the unmerged model's."""
    L.seed_everything(0)
    module = (BuiltInInit if kind == "ddp" else ShardedBuiltInInit)()
    merged_dir = out / f"merged_{kind}"
    callback = LoraCallback(lora_config(), merge_on_fit_end=True, merged_weights_dir=merged_dir)
    fit(module, strategy_for(kind), 1, [callback])
    x = probe_inputs()
    with torch.no_grad():
        merged = module.model(x)
        reshard_fsdp2(module)  # FSDP2 keeps the root unsharded after a forward; edits must reach the shards
        unmerge_lora(module)
        unmerged = module.model(x)
    if global_rank() == 0:
        torch.save({"merged": merged, "unmerged": unmerged, "inputs": x}, out / "merge.pt")


def main() -> None:
    kind, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    merge_on_fit_end(kind, out)
    if kind == "ddp":
        uninterrupted_and_resumed(kind, out, "ddp", lambda: (BuiltInInit(), [LoraCallback(lora_config())]))
        return
    uninterrupted_and_resumed(
        kind, out, "fsdp2-sharded", lambda: (ShardedBuiltInInit(), [LoraCallback(lora_config())])
    )

    def mixin() -> tuple[L.LightningModule, list]:
        optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # noqa: E731
        return ShardedMixinBuiltInConfigureModel(lora_config=lora_config(), optimizer=optimizer), []

    uninterrupted_and_resumed(kind, out, "fsdp2-full", mixin, distributed_checkpoint=False)


if __name__ == "__main__":
    main()

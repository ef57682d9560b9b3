"""Two-process Lightning runs for tests/test_svd_init_lightning.py: SVD-initialised adapters under DDP and FSDP2
(ModelParallelStrategy) on CPU with gloo (``cpu``), FSDP1 and DeepSpeed ZeRO-3 on two GPUs (``fsdp1``,
``deepspeed``). Lightning re-launches this script for rank 1.

    python svd_init_runs.py {cpu|fsdp1|deepspeed} OUT_DIR

For each ``<kind>`` (``ddp``, ``fsdp2``, ``fsdp1``, ``deepspeed``) it writes ``<kind>-uninterrupted-rank<r>.pt``
(two epochs) and ``<kind>-resumed-rank<r>.pt`` (one epoch, checkpoint, a new Trainer and module, one more epoch),
each ``{"adapter": full adapter tensors, "weights": full base weights of the adapted layers}`` as seen from rank
``r``, and keeps the checkpoints under ``<kind>-checkpoints/``. The DDP resume runs with every SVD routine made to
fail: restoring must not compute an init.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import (
    BuiltInInit,
    ShardedBuiltInInit,
    dataloader,
    exit_cleanly,
    lora_config,
    trainer_arguments,
)

import lightning_lora.core.inits.svd_init as svd_init
from lightning_lora import LoraCallback, adapter_state_dict
from lightning_lora.core.common.distributed import full_tensor

INIT = "pissa_niter_2"  # randomised SVD: ranks agree only because its projection is seeded the same everywhere
EPOCHS = 2
ADAPTED = ("fc1", "fc2")


def svd_config():
    return lora_config(init=INIT)


def fit(module: L.LightningModule, strategy: Any, accelerator: str, epochs: int, checkpoint_dir: Optional[Path] = None,
        ckpt_path: Optional[Path] = None) -> int:
    """Fit and return this process's global rank."""
    callbacks: list = [LoraCallback(svd_config())]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="epoch{epoch}", save_top_k=-1))
    trainer = L.Trainer(**trainer_arguments(accelerator=accelerator, devices=2, strategy=strategy, max_epochs=epochs,
                                            callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None))
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return trainer.global_rank


def snapshot(module: L.LightningModule) -> dict[str, Any]:
    """Full CPU copies of the adapter tensors and of the adapted layers' base weights, as this rank holds them
    (FSDP2 shards and ZeRO-3 partitions are gathered: every rank takes part)."""
    gathered = nullcontext()
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gathered:
        weights = {f"model.{name}.weight": getattr(module.model, name).weight for name in ADAPTED}
        return {key: {k: full_tensor(v.detach()).cpu().clone() for k, v in state.items()}
                for key, state in (("adapter", adapter_state_dict(module)), ("weights", weights))}


@contextmanager
def svd_forbidden() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an SVD init ran while resuming")

    saved = {name: getattr(svd_init, name) for name in ("pissa_factors", "milora_factors", "olora_factors")}
    for name in saved:
        setattr(svd_init, name, refuse)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(svd_init, name, function)


def runs(out: Path, kind: str, module_class: type, strategy: Any, accelerator: str, resume_computes_init: bool) -> None:
    L.seed_everything(0)
    module = module_class()
    rank = fit(module, strategy(), accelerator, EPOCHS)
    torch.save(snapshot(module), out / f"{kind}-uninterrupted-rank{rank}.pt")

    checkpoints = out / f"{kind}-checkpoints"
    L.seed_everything(0)
    fit(module_class(), strategy(), accelerator, 1, checkpoint_dir=checkpoints)
    L.seed_everything(0)
    module = module_class()
    with nullcontext() if resume_computes_init else svd_forbidden():
        fit(module, strategy(), accelerator, EPOCHS, ckpt_path=checkpoints / "epochepoch=0.ckpt")
    torch.save(snapshot(module), out / f"{kind}-resumed-rank{rank}.pt")


def main() -> None:
    group, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    # FSDP and DeepSpeed restore after fit start, over an adapter initialised there (deterministically: the same
    # values); single-device and DDP runs restore before, and must not compute an init at all.
    if group == "cpu":
        from lightning.pytorch.strategies import ModelParallelStrategy

        runs(out, "ddp", BuiltInInit, lambda: "ddp", "cpu", resume_computes_init=False)
        fsdp2 = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # noqa: E731
        runs(out, "fsdp2", ShardedBuiltInInit, fsdp2, "cpu", resume_computes_init=True)
    elif group == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        fsdp1 = lambda: FSDPStrategy(auto_wrap_policy={torch.nn.Linear}, state_dict_type="sharded")  # noqa: E731
        runs(out, "fsdp1", BuiltInInit, fsdp1, "cuda", resume_computes_init=True)
    elif group == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        runs(out, "deepspeed", BuiltInInit, lambda: DeepSpeedStrategy(stage=3), "cuda", resume_computes_init=True)
    else:
        raise ValueError(f"unknown group {group!r}")


if __name__ == "__main__":
    main()
    exit_cleanly()

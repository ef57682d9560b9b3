"""Runs in their own processes for tests/test_exact_resume.py (and the cost measurement in docs/lightning.md).

    python resume_workers.py ddp OUT [--without]     two DDP processes (gloo, CPU); Lightning re-launches rank 1
    python resume_workers.py train OUT [--without]   one process that trains until it is killed (see ``train``)
    python resume_workers.py cost                    bytes and time ExactResume adds to each checkpoint

``--without`` runs with ``LoraCallback(exact_resume=False)`` (what Lightning alone does). Every run trains
:func:`make_module` on :func:`make_loader` with the same seeds, so the test process can train the same run itself.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_models import BuiltInInit, exit_cleanly, lora_config, trainer_arguments
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoraCallback, adapter_state_dict

EPOCHS = 3
BATCHES_PER_EPOCH = 6  # per process
DDP_POINTS = {"mid_epoch": 3, "epoch_end": 6, "later_epoch": 9}  # steps whose checkpoint a resume starts from
KILL_AT_STEP = 8  # the train run blocks while writing last.ckpt after this step (epoch 1, batch 2), then is killed


def make_module() -> L.LightningModule:
    """A small regression model with LoRA dropout (every step draws from torch's generator)."""
    return BuiltInInit()


def make_loader(processes: int = 1) -> DataLoader:
    """Shuffled by the global seed (no generator of its own); 6 batches an epoch on each process."""
    generator = torch.Generator().manual_seed(123)
    samples = 4 * BATCHES_PER_EPOCH * processes
    x, y = torch.randn(samples, 8, generator=generator), torch.randn(samples, 4, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def seed(rank: int = 0) -> None:
    """The same start on every run; each process's torch generator differs (dropout masks differ per rank)."""
    L.seed_everything(0, verbose=False)
    torch.manual_seed(1000 + rank)


def fit(
    exact: bool,
    checkpoints: Optional[Path] = None,
    ckpt_path: Optional[Path] = None,
    processes: int = 1,
    extra_callbacks: tuple[Callback, ...] = (),
) -> tuple[dict[str, torch.Tensor], int]:
    """Train (or resume) the run; returns the adapter (CPU copies) and the number of optimizer steps."""
    seed(int(os.environ.get("LOCAL_RANK", 0)))
    module = make_module()
    callbacks: list[Callback] = [LoraCallback(lora_config(dropout=0.1), exact_resume=exact), *extra_callbacks]
    if checkpoints is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=1, save_top_k=-1,
                            save_last=True)
        )
    strategy: dict[str, Any] = {"strategy": "ddp", "devices": processes} if processes > 1 else {}
    trainer = L.Trainer(**trainer_arguments(
        max_epochs=EPOCHS, callbacks=callbacks, enable_checkpointing=checkpoints is not None, **strategy
    ))
    trainer.fit(module, make_loader(processes), ckpt_path=ckpt_path)
    adapter = {key: value.detach().clone() for key, value in adapter_state_dict(module).items()}
    return adapter, trainer.global_step


def ddp(out: Path, exact: bool) -> None:
    """The uninterrupted two-process run with a checkpoint per step, then one resume from each of DDP_POINTS."""
    results: dict[str, Any] = {"uninterrupted": fit(exact, checkpoints=out / "checkpoints", processes=2)}
    for name, step in DDP_POINTS.items():
        results[name] = fit(exact, ckpt_path=out / "checkpoints" / f"step={step}.ckpt", processes=2)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(results, out / "ddp.pt")


class _StopAtStep(Callback):
    """Signals ``ready`` and blocks forever after step ``step``: inside the write of ``last.ckpt`` where the
    writes are atomic (after the data is flushed, before the rename), else at the next batch."""

    def __init__(self, step: int, ready: Path) -> None:
        self.step, self.ready = step, ready

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import lightning_lora.lightning.resume.atomic as atomic

        real_replace = atomic.os.replace

        def replace(source: str, target: str) -> None:
            if Path(target).name == "last.ckpt" and trainer.global_step == self.step:
                self._block()
            real_replace(source, target)

        atomic.os.replace = replace  # type: ignore[assignment]  # this process only

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self._block()

    def _block(self) -> None:
        self.ready.touch()
        while True:
            time.sleep(1)


def train(out: Path, exact: bool) -> None:
    """Train with a checkpoint and ``last.ckpt`` per step until killed (the test SIGKILLs it at ``ready``)."""
    fit(exact, checkpoints=out / "checkpoints", extra_callbacks=(_StopAtStep(KILL_AT_STEP, out / "ready"),))


class _TimeSaves(Callback):
    """Per step: the time of a full ``trainer.save_checkpoint`` and, with ExactResume, the time to collect its
    state and that state's serialised bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saves: list[float] = []
        self.collect: list[float] = []
        self.bytes: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        import io

        from lightning_lora.lightning.resume import ExactResume

        start = time.perf_counter()
        trainer.save_checkpoint(self.path)
        self.saves.append(time.perf_counter() - start)
        callback = next((c for c in trainer.callbacks if isinstance(c, ExactResume)), None)
        if callback is not None:
            start = time.perf_counter()
            state = callback.state_dict()
            self.collect.append(time.perf_counter() - start)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.bytes.append(buffer.tell())


def _median_ms(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] * 1e3


def cost() -> None:
    """Print what ExactResume adds to each checkpoint: bytes, the time to collect its state, the time of a save."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        timers = {}
        for exact in (False, True):
            timers[exact] = timer = _TimeSaves(Path(directory) / f"{exact}.ckpt")
            fit(exact, extra_callbacks=(timer,))
            size = timer.path.stat().st_size
            print(f"exact_resume={exact}: checkpoint {size} bytes, trainer.save_checkpoint "
                  f"{_median_ms(timer.saves):.2f} ms (median of {len(timer.saves)})")
        print(f"ExactResume state: {sum(timers[True].bytes) / len(timers[True].bytes):.0f} bytes serialised, "
              f"collected in {_median_ms(timers[True].collect):.3f} ms (median)")


def main() -> None:
    torch.set_num_threads(1)
    mode = sys.argv[1]
    exact = "--without" not in sys.argv
    if mode == "ddp":
        ddp(Path(sys.argv[2]), exact)
    elif mode == "train":
        train(Path(sys.argv[2]), exact)
    elif mode == "cost":
        cost()
    else:
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
    exit_cleanly()

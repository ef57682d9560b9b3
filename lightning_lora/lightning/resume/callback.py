"""The :class:`ExactResume` callback: a resumed run continues as if it had never stopped."""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_lora.lightning.resume.atomic import make_checkpoint_writes_atomic
from lightning_lora.lightning.resume.loops import OnFirstFetch, gather_from_processes, replace_method, restore_method
from lightning_lora.lightning.resume.rng import (
    capture_rng_states,
    generator_states,
    restore_generator_states,
    restore_rng_states,
)
from lightning_lora.lightning.resume.sampling import (
    ReplayableIndexSampler,
    describe_sampler,
    install_replayable_sampler,
    is_replayable,
    is_stateful,
    remove_replayable_sampler,
    sampler_generators,
)

_VERSION = 1
# Lightning warns on every mid-epoch resume of a loader without state_dict; with ExactResume that loader is resumed.
_LIGHTNING_NOT_RESUMABLE = re.escape("You're resuming from a checkpoint that ended before the epoch ended")
_LOADER_HOOK = "_load_combined_loader_states"  # _FitLoop: the train loaders are built, their iterators not yet


class ExactResume(Callback):
    r"""Resume training from any checkpoint to the same result as the run that never stopped (bitwise on CPU).

    Every checkpoint gets, per process: how many batches of the current epoch were trained, the random states
    the epoch's order was drawn from, and the states of every random generator at the moment of the save (Python,
    NumPy, torch CPU, each CUDA device, the loader's and sampler's ``torch.Generator``). A run resumed with
    ``Trainer.fit(ckpt_path=...)`` then

    - continues a part-trained epoch with the batches it has not seen, in the order the uninterrupted epoch used: a
      plain ``DataLoader``'s sampler (sequential, shuffled by its ``generator`` or by the global seed,
      ``DistributedSampler``, a batch sampler) draws its order again from the saved states and drops the batches
      already trained, without loading them; the ``DataLoader`` is used as it is;
    - restores the generators right before the next batch is fetched, so the step after the checkpoint draws
      exactly what it drew (dropout, augmentations, schedules), and a new epoch shuffles as it did;
    - leaves loaders with their own ``state_dict`` (torchdata's ``StatefulDataLoader``) to Lightning, which saves
      and restores them; they are not skipped a second time.

    Validation (and the sanity check) gives the generators back as it found them when it ends: a resumed run does
    not repeat validation that ran after its checkpoint, so the training steps must not depend on its draws. Hence a
    run with validation and random training steps draws other numbers with ExactResume than without it (runs
    without validation draw the same).

    A loader that can neither be positioned nor saves its position (an ``IterableDataset`` without
    ``state_dict``) is resumed mid-epoch from the start of its iteration, with a warning (once).
    With ``atomic_checkpoints`` every local checkpoint file is written atomically (a temporary file in the same
    directory, flushed, renamed over the target), so a process killed at any moment leaves complete checkpoints
    only. ``LoraCallback`` adds an ``ExactResume`` to its Trainer unless it has one (``exact_resume=False`` to
    opt out).

    Checkpoints taken at optimizer steps resume exactly. Gradients accumulated between optimizer steps are not
    checkpointed: a checkpoint taken between the micro-batches of an accumulated step warns once when written.

    Args:
        atomic_checkpoints: Write local checkpoint files atomically (default ``True``; only the default
            ``TorchCheckpointIO`` is changed).

    Raises:
        TypeError: ``atomic_checkpoints`` is not a bool.

    Example::

        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_lora import ExactResume

        def callbacks():
            return [ExactResume(), ModelCheckpoint(dirpath="checkpoints", every_n_train_steps=100, save_last=True)]

        L.Trainer(max_epochs=4, callbacks=callbacks()).fit(model, train_dataloader)  # killed at some step
        # a new process, the same model and data: ends where the uninterrupted run would have ended
        L.Trainer(max_epochs=4, callbacks=callbacks()).fit(model, train_dataloader, ckpt_path="checkpoints/last.ckpt")
    """

    def __init__(self, atomic_checkpoints: bool = True) -> None:
        if not isinstance(atomic_checkpoints, bool):
            raise TypeError(f"atomic_checkpoints must be True or False, got {atomic_checkpoints!r}.")
        self.atomic_checkpoints = atomic_checkpoints
        self._trainer: Optional[pl.Trainer] = None
        self._loaders: list[tuple[Any, Optional[ReplayableIndexSampler], dict[str, torch.Generator]]] = []
        self._saved: Optional[dict[str, Any]] = None  # this process's state from the checkpoint, until applied
        self._positioned = False
        self._silenced: Optional[tuple] = None
        self._warned: set[str] = set()
        self._before_validation: Optional[dict[str, Any]] = None

    # ----- lifecycle -----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._saved, self._positioned = None, False  # a checkpoint's state arrives after setup, if resuming
        if self.atomic_checkpoints:
            make_checkpoint_writes_atomic(trainer.strategy)
        fit_loop = trainer.fit_loop
        hooked = replace_method(fit_loop, _LOADER_HOOK, self, self._after_loaders_built)
        hooked &= replace_method(fit_loop.epoch_loop, "on_run_start", self, self._after_epoch_iterator_made)
        hooked &= replace_method(fit_loop.epoch_loop.val_loop, "run", self, self._without_random_draws)
        if not hooked:
            self._warn_once("lightning", (
                "ExactResume needs Lightning 2.x's fit loop (_FitLoop._load_combined_loader_states, "
                "_TrainingEpochLoop.on_run_start, _EvaluationLoop.run); with this version checkpoints resume as "
                "Lightning resumes them."
            ))
            self._remove(trainer)

    # ----- the places in Lightning's loops (see resume/loops.py) -----
    def _after_loaders_built(self, original: Callable[[], None]) -> Callable[[], None]:
        fit_loop = self._trainer.fit_loop  # type: ignore[union-attr]

        def load_loader_states() -> None:
            original()  # Lightning restores the loaders that have their own state
            if fit_loop._combined_loader is not None:
                self._prepare_loaders(fit_loop._combined_loader.flattened)

        return load_loader_states

    def _after_epoch_iterator_made(self, original: Callable[[Any], None]) -> Callable[[Any], None]:
        epoch_loop = self._trainer.fit_loop.epoch_loop  # type: ignore[union-attr]

        def on_run_start(data_fetcher: Any) -> None:
            original(data_fetcher)
            if self._saved is not None:
                self._before_first_fetch(epoch_loop, data_fetcher)

        return on_run_start

    def _without_random_draws(self, original: Callable[[], Any]) -> Callable[[], Any]:
        """Validation (and the sanity check) leaves the global generators as it found them.

        Validation that ran after a checkpoint was written is not run again by the resumed run, yet it drew from the
        generators (each validation's loader iterator draws a seed from torch's): with its draws undone, the training
        steps' stream is the same with or without it, and so is the resumed run's.
        """

        def run() -> Any:
            self._before_validation = before = capture_rng_states()
            try:
                return original()
            finally:
                restore_rng_states(before)
                self._before_validation = None

        return run

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove(trainer)  # Lightning skips the teardown hook then

    def _remove(self, trainer: pl.Trainer) -> None:
        """Give the loops and loaders back as they were (a later fit may use the same loader elsewhere)."""
        fit_loop = trainer.fit_loop
        restore_method(fit_loop, _LOADER_HOOK, self)
        restore_method(fit_loop.epoch_loop, "on_run_start", self)
        restore_method(fit_loop.epoch_loop.val_loop, "run", self)
        for loader, _, _ in self._loaders:
            remove_replayable_sampler(loader)
        self._loaders = []
        self._saved, self._positioned = None, False
        self._stop_silencing()

    # ----- saving -----
    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {}
        return {"version": _VERSION, "ranks": gather_from_processes(self._process_state(trainer))}

    def _process_state(self, trainer: pl.Trainer) -> dict[str, Any]:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        trained = progress.current.processed
        epoch_done = progress.is_last_batch or trained >= trainer.num_training_batches
        if not epoch_done and trainer.fit_loop.epoch_loop._should_accumulate():
            self._warn_once("accumulating", (
                f"A checkpoint was written after batch {trained} of the epoch, between the micro-batches of an "
                f"accumulated optimizer step (accumulate_grad_batches={trainer.accumulate_grad_batches}); the "
                "accumulated gradients are not in it, so resuming from it is not exact. Save at optimizer steps, "
                "e.g. ModelCheckpoint(every_n_train_steps=...)."
            ))
        return {
            "epoch": trainer.current_epoch,
            "batches": trained,
            "epoch_done": bool(epoch_done),
            # written during validation (ModelCheckpoint on a validation metric): training goes on from the
            # states validation found, which it gets back when it ends
            "rng": self._before_validation if self._before_validation is not None else capture_rng_states(),
            "loaders": [
                {
                    "sampler": describe_sampler(loader),
                    "generators": generator_states(generators),
                    "epoch_start": replayable.epoch_start if replayable is not None else None,
                }
                for loader, replayable, generators in self._loaders
            ],
        }

    # ----- resuming -----
    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = self._trainer
        ranks = state_dict.get("ranks", [])
        if trainer is None or not ranks or trainer.state.fn != "fit":
            return
        if len(ranks) != trainer.world_size:
            self._warn_once("world", (
                f"The checkpoint was written by {len(ranks)} processes and is resumed by {trainer.world_size}: "
                "the data position and random states cannot be exact, so neither is restored. Resume with the "
                "number of processes that wrote it for an exact resume."
            ))
            return
        self._saved = ranks[trainer.global_rank]
        self._positioned = False

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}) and "loops" in checkpoint:
            self._warn_once("absent", (
                "The checkpoint has no ExactResume state (it was written without the callback): training resumes "
                "as Lightning resumes it, not exactly. Checkpoints written from now on resume exactly."
            ))

    def _prepare_loaders(self, loaders: list[Any]) -> None:
        """Lightning has built the train loaders and is about to make their iterators."""
        for loader, _, _ in self._loaders:
            if all(loader is not current for current in loaders):
                remove_replayable_sampler(loader)  # reloaded loaders
        self._loaders = []
        for loader in loaders:
            replayable = install_replayable_sampler(loader) if is_replayable(loader) else None
            generators = replayable.generators if replayable is not None else sampler_generators(loader)
            self._loaders.append((loader, replayable, generators))
        saved = self._saved
        if saved is None or self._positioned:
            return
        self._positioned = True
        skip = 0 if saved["epoch_done"] else saved["batches"]
        if skip == 0:
            return
        if len(saved["loaders"]) != len(loaders):
            self._warn_once("loaders", (
                f"The checkpoint was written with {len(saved['loaders'])} train loaders and is resumed with "
                f"{len(loaders)}: the epoch continues from the loaders' start, not exactly."
            ))
            return
        positioned = True
        for (loader, replayable, _), loader_state in zip(self._loaders, saved["loaders"]):
            if replayable is not None and loader_state.get("epoch_start") is not None:
                replayable.resume_at(skip, loader_state["epoch_start"])
            elif not is_stateful(loader):
                positioned = False
                self._warn_once("position", (
                    f"Resuming after batch {skip} of an epoch, but the train loader ({type(loader).__name__} over "
                    f"{type(getattr(loader, 'dataset', loader)).__name__}) cannot be positioned: an iterable "
                    "dataset has no index to skip to. Its epoch restarts from its first batch, so this resume is not "
                    "exact. Make it exact with a map-style Dataset, or a loader that saves its position "
                    "(state_dict/load_state_dict, e.g. torchdata's StatefulDataLoader)."
                ))
        if positioned:
            warnings.filterwarnings("ignore", message=_LIGHTNING_NOT_RESUMABLE)
            self._silenced = warnings.filters[0]

    def _before_first_fetch(self, epoch_loop: Any, fetcher: Any) -> None:
        if fetcher.length is None:
            # A loader without length: Lightning's fetcher has fetched a batch ahead already; fetch it again after
            # the restore (a loader with its own state keeps its resumed iterator mid-epoch).
            saved = self._restore(epoch_loop, check_position=False)
            if saved["epoch_done"] or not any(is_stateful(loader) for loader, _, _ in self._loaders):
                iter(fetcher)
                fetcher.fetched += epoch_loop.batch_progress.current.ready
            return

        def restore() -> None:
            saved = self._restore(epoch_loop, check_position=True)
            if saved["epoch_done"]:
                # The new epoch's iterators, made from the restored states as the uninterrupted run made them. A
                # loader with its own state was given the checkpoint's, an epoch iterated to its end: the iterator
                # Lightning made from it has nothing left.
                iter(fetcher.combined_loader)

        OnFirstFetch(fetcher, restore)

    def _restore(self, epoch_loop: Any, check_position: bool) -> dict[str, Any]:
        """Set every generator to its state in the checkpoint; returns this process's saved state."""
        saved, self._saved = self._saved, None
        assert saved is not None
        self._stop_silencing()
        restore_rng_states(saved["rng"])
        for (loader, _, generators), loader_state in zip(self._loaders, saved["loaders"]):
            restore_generator_states(generators, loader_state.get("generators", {}))
            now = describe_sampler(loader)
            then = dict(loader_state.get("sampler", now))
            if saved["epoch_done"] and "epoch" in then:
                then["epoch"] += 1  # written at an epoch's end: the resumed run goes on with the next epoch
            if now != then:
                self._warn_once("sampler", (
                    f"The train sampler differs from the checkpoint's ({then} expected, {now} now): the resumed "
                    "order is not the uninterrupted run's."
                ))
        expected = 0 if saved["epoch_done"] else saved["batches"]
        position = epoch_loop.batch_progress.current.ready
        if check_position and position != expected:
            self._warn_once("disagree", (
                f"Lightning resumes after batch {position} of the epoch, the checkpoint was written after batch "
                f"{expected}: the data position is not the uninterrupted run's."
            ))
        return saved

    # ----- helpers -----
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _stop_silencing(self) -> None:
        if self._silenced is not None:
            try:
                warnings.filters.remove(self._silenced)
            except ValueError:
                pass
            mutated = getattr(warnings, "_filters_mutated", None)
            if callable(mutated):
                mutated()
            self._silenced = None


def attach_exact_resume(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """Add an :class:`ExactResume` to the Trainer's callbacks unless it has one (called from ``LoraCallback``)."""
    if stage == "fit" and not any(isinstance(callback, ExactResume) for callback in trainer.callbacks):
        callback = ExactResume()
        trainer.callbacks.append(callback)
        callback.setup(trainer, pl_module, stage)

r"""
Exact resume
============

A run resumed from any checkpoint (mid-epoch, epoch end, after a kill) trains to the bitwise result of the run that
never stopped, on CPU, with the user's ``DataLoader`` as it is. :class:`ExactResume` does it; ``LoraCallback`` adds
one to its Trainer by default.

Where it hooks into Lightning (2.6), and why there (:mod:`~lightning_lora.lightning.resume.loops`; each is a method
of the Trainer's own loop instance, replaced on that instance and given back at teardown):

- **Data position: ``_FitLoop._load_combined_loader_states``.** ``setup_data`` builds the train loaders (Lightning's
  distributed sampler already injected), restores the ones that have their own state through this method (part of
  Lightning's ``restarting`` machinery), and only then makes their iterators. It is the one moment every run passes
  (first epoch, resume, reloaded loaders) at which the loaders are final and no iterator, worker or prefetch has
  started. There each map-style loader gets a
  :class:`~lightning_lora.lightning.resume.sampling.ReplayableIndexSampler` in place of its batch sampler; on resume
  it is told how many batches to drop (the epoch's trained batches, which Lightning's restored ``batch_progress``
  counts too) and the random states to draw the epoch's order from again. Dropping indices rather than batches loads
  no data, works with worker processes (they get indices only after the drop) and with any sampler. Hooking
  ``on_train_epoch_start`` would come too late (Lightning makes the first epoch's iterator before any epoch hook, and
  a resumed mid-epoch run calls no epoch-start hook), and wrapping the ``_DataFetcher`` would drop loaded batches.
- **Random states: ``_TrainingEpochLoop.on_run_start``.** Every checkpoint holds every process's generator states
  at the moment it was written (gathered to the writing rank). They are restored right before the first batch after
  the resume is fetched: after ``on_run_start`` (the epoch's iterator is ready), the data fetcher's iterator is
  wrapped until that fetch. That is where the uninterrupted run went on from the states it had when the checkpoint
  was written; the resumed run's own start-up (``on_train_start`` hooks, the iterators it made, an epoch Lightning
  closes without a batch) lies behind it. A resume at an epoch boundary makes the new epoch's iterators there, after
  the restore, so their draws (the loader's base seed, a shuffle from the global seed) come from the same states.
- **Validation: ``_EvaluationLoop.run``.** A resumed run does not repeat validation that ran after its checkpoint was
  written, so validation's draws (each validation's loader iterator draws a seed from torch's generator) are undone
  when it ends: the training steps draw the same numbers with or without it.
- **Atomic files.** Lightning's local write ends in a ``shutil.move`` from the system temp directory, a copy across
  filesystems; :mod:`~lightning_lora.lightning.resume.atomic` renames a flushed file from the checkpoint's directory.
"""

from lightning_lora.lightning.resume.atomic import make_checkpoint_writes_atomic, write_atomically
from lightning_lora.lightning.resume.callback import ExactResume, attach_exact_resume

__all__ = ["ExactResume", "attach_exact_resume", "make_checkpoint_writes_atomic", "write_atomically"]

"""Checkpoint files that are either whole or absent.

Lightning writes a local checkpoint through an fsspec transaction: ``torch.save`` into memory, then a temporary file
in the system temp directory moved over the target with ``shutil.move``. When the temp directory is on another
filesystem than the checkpoint (a tmpfs ``/tmp``, a network volume), that move is a copy, and a process killed
during the copy leaves a truncated ``last.ckpt``; nothing is flushed to disk either. :func:`write_atomically` writes
into a temporary file in the checkpoint's own directory, flushes it to disk (``fsync``: the rename never makes a file
visible whose data could still be lost with the machine), and renames it over the target (``os.replace``, atomic on
POSIX and Windows): a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import MethodType
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

_PATCHED = "_lightning_lora_atomic"


def write_atomically(checkpoint: Any, path: os.PathLike | str) -> None:
    """``torch.save(checkpoint, path)``, so that ``path`` is never seen half-written, even by a process killed
    mid-write (a stray ``.<name>.*.tmp`` file is all such a kill leaves; the next write of ``path`` removes it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)


def make_checkpoint_writes_atomic(strategy: Any) -> bool:
    """Make the strategy's local checkpoint files atomic (:func:`write_atomically`). Only the default
    ``TorchCheckpointIO`` is changed (a custom or asynchronous one keeps its own way); idempotent.

    Returns:
        Whether the strategy's checkpoint writes are now atomic.
    """
    io = strategy.checkpoint_io
    if type(io) is not TorchCheckpointIO:
        return False
    if io.__dict__.get(_PATCHED):
        return True
    original = io.save_checkpoint

    def save_checkpoint(
        self: TorchCheckpointIO, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return original(checkpoint, path, storage_options)
        write_atomically(checkpoint, path)
        return None

    io.save_checkpoint = MethodType(save_checkpoint, io)
    io.__dict__[_PATCHED] = True
    return True

"""Files on disk: crash-safe directory writes and safetensors reading/writing with clear errors.

Writes stage every file beside the target, then move the files in, the entry file last.

A reader opens a saved folder through one entry file (``adapter_config.json`` for an adapter, the index or
``model.safetensors`` for a merged model). The staging folder lives in the target's parent, so every move is a
same-filesystem ``rename``. A new target folder appears in one rename; into an existing folder the old entry file is
removed first and the new one moved in last, so an interrupted save leaves either the complete new files or a folder
without an entry file (which fails to load with a clear error), never a mix that loads. Other files in an existing
folder (a tokenizer, a README) are kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PathLike = Union[str, os.PathLike]


def is_writer() -> bool:
    """True on the process that writes files: global rank 0, or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_writable_directory(directory: PathLike, what: str = "The save directory") -> Path:
    """Check that a save can write ``directory`` (see :func:`publish`): it is a folder or can be created, and the
    folders a save writes in accept new files: ``directory`` itself when it exists, and the nearest existing folder
    above it (the staging folder is made beside ``directory``, missing parents first).

    Each of those folders is tested with ``os.access`` and by creating and deleting an empty probe file, so a
    read-only filesystem, a full quota or an ACL refuse here as they would at the save; nothing else changes on
    disk.

    Args:
        directory: The folder a save will write.
        what: How the message names it (``"AdapterExport(dirpath=...)"``).

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: ``directory`` is an existing file, a parent on its path is a file, or a folder does not accept
            new files. The message names ``directory`` as given.
    """
    directory = Path(directory)
    shown = f"{what} {str(directory)!r}"
    try:
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{shown} is an existing file, not a directory; choose a directory path to save into.")
        ancestor = directory.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
    except OSError as err:  # a parent that cannot be searched
        raise ValueError(f"{shown} cannot be reached ({err.strerror or err}); choose a path you can write.") from None
    if not ancestor.is_dir():
        raise ValueError(
            f"{shown} cannot be created: {str(ancestor)!r} on its path is a file, not a directory. Choose a path "
            "under a directory."
        )
    for folder in ([directory] if directory.is_dir() else []) + [ancestor]:
        problem = _write_problem(folder)
        if problem:
            raise ValueError(
                f"{shown} is not writable: {str(folder)!r} does not accept new files ({problem}). Choose a writable "
                "location, or fix the folder's permissions."
            )
    return directory


def _write_problem(folder: Path) -> Optional[str]:
    """Why a new file cannot be created in ``folder``, or None when it can (tested with an empty probe file)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "no write permission"
    probe = folder / f".lightning_lora-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        return err.strerror or str(err)
    os.close(descriptor)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


@contextlib.contextmanager
def staging_directory(directory: PathLike) -> Iterator[Path]:
    """An empty folder on the same filesystem as ``directory``, deleted on exit whatever happens.

    Raises:
        ValueError: ``directory`` cannot be written (see :func:`check_writable_directory`); nothing is created then.
    """
    directory = check_writable_directory(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would stay on a new directory published by renaming the staging folder.
    staging = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, directory: PathLike, entry_file: str, stale: Iterable[str] = ()) -> None:
    """Move the staged files into ``directory``; ``entry_file`` (staged) is the one moved last.

    Args:
        staging: Folder from :func:`staging_directory` holding the complete new files.
        directory: Target folder, created if missing.
        entry_file: Name of the file readers open first.
        stale: Names of files from an earlier save that must not survive next to the new ones (old shards).
    """
    directory = Path(directory)
    files = sorted(p.name for p in staging.iterdir())
    if entry_file not in files:
        raise RuntimeError(f"{entry_file} was not staged; nothing was written to {directory}.")
    for name in files:
        _fsync_file(staging / name)
    _fsync_dir(staging)
    if not directory.exists():
        try:
            os.rename(staging, directory)
            _fsync_dir(directory.parent)
            return
        except OSError:
            if not directory.is_dir():  # lost a race with another writer that created it: fall through
                raise
    old_entry = directory / entry_file
    if old_entry.exists():
        old_entry.unlink()
        _fsync_dir(directory)
    for name in set(stale) - set(files):
        (directory / name).unlink(missing_ok=True)
    for name in [n for n in files if n != entry_file] + [entry_file]:
        os.replace(staging / name, directory / name)
    _fsync_dir(directory)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable on POSIX; directories cannot be opened this way on Windows.
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write tensors (moved to CPU, made contiguous; tensors sharing memory are copied) to one safetensors file."""
    seen: set[int] = set()
    ready = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage().data_ptr()
        if value.numel() and storage in seen:
            value = value.clone()  # safetensors refuses aliased tensors
        seen.add(storage)
        ready[key] = value
    save_file(ready, str(path), metadata={"format": "pt", **(metadata or {})})
    # safetensors >= 0.8 creates the file owner-only (0o600); give it the mode any other new file gets, so a server
    # running as another user (vLLM) can read a shared adapter folder.
    os.chmod(path, 0o666 & ~_current_umask())


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it
    os.umask(mask)
    return mask


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file and its metadata.

    Raises:
        ValueError: The file is truncated or corrupt.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt. Save it again (or copy "
            "it again from its source)."
        ) from None

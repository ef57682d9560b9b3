"""The places in Lightning's loops where :class:`~lightning_lora.lightning.resume.ExactResume` acts.

Each is a method of one loop instance (the Trainer's), replaced on that instance only and given back at teardown:
``_FitLoop._load_combined_loader_states`` (train loaders built, no iterator yet), ``_TrainingEpochLoop.on_run_start``
(an epoch's iterator ready, no batch fetched yet) and ``_EvaluationLoop.run`` (one validation).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_OWNER = "_exact_resume"


def replace_method(
    loop: Any, name: str, owner: object, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> bool:
    """Set ``loop.<name>`` (on the instance) to ``make(original bound method)``, once per ``owner``.

    Returns:
        False when the loop's class has no such method (another Lightning version): nothing is changed.
    """
    if getattr(loop.__dict__.get(name), _OWNER, None) is owner:
        return True
    method = getattr(type(loop), name, None)
    if method is None:
        return False
    replacement = make(method.__get__(loop))
    setattr(replacement, _OWNER, owner)
    loop.__dict__[name] = replacement
    return True


def restore_method(loop: Any, name: str, owner: object) -> None:
    """Undo :func:`replace_method` (if ``owner`` made the replacement)."""
    if getattr(loop.__dict__.get(name), _OWNER, None) is owner:
        del loop.__dict__[name]


class OnFirstFetch:
    """Stands in for a data fetcher's iterator until the next fetch: runs ``action`` then, and steps aside."""

    def __init__(self, fetcher: Any, action: Callable[[], None]) -> None:
        self.fetcher = fetcher
        self.inner = fetcher.iterator
        self.action = action
        fetcher.iterator = self

    def __iter__(self) -> "OnFirstFetch":
        return self

    def __next__(self) -> Any:
        self.fetcher.iterator = self.inner
        self.action()
        return next(self.inner)


def gather_from_processes(state: Any) -> list[Any]:
    """Every process's ``state``, in rank order (every process calls this, as every process writes a checkpoint)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered

"""Where a DataLoader is in its epoch, and how to start an epoch part-way in the order it had.

A map-style ``DataLoader`` draws its order from one object, its batch sampler (or its sampler when ``batch_size`` is
None). :class:`ReplayableIndexSampler` takes that object's place in the loader: it yields the same batches of
indices, remembers the random states the epoch's order was drawn from (the global generators' and the sampler's own
``torch.Generator``), and can start an epoch after its first ``k`` batches by drawing the order again from those
states and dropping ``k`` batches of indices (no sample is loaded). Whatever the sampler is (sequential, shuffled by
a generator or by the global seed, ``DistributedSampler``, a custom batch sampler), the replay draws what the
uninterrupted epoch drew.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_lora.lightning.resume.rng import capture_rng_states, generator_states, rng_states_set_to

_SAMPLER_ATTRIBUTES = ("batch_sampler", "sampler")


class ReplayableIndexSampler:
    """A DataLoader's batch sampler (or sampler), able to start an epoch after its first batches.

    Args:
        inner: The sampler it stands in for; every attribute not defined here is ``inner``'s.
        generators: The ``torch.Generator`` objects ``inner`` draws from, by attribute path.
    """

    def __init__(self, inner: Iterable, generators: dict[str, torch.Generator]) -> None:
        self.inner = inner
        self.generators = generators
        self.epoch_start: Optional[dict[str, Any]] = None  # the random states this epoch's order was drawn from
        self._resume: Optional[tuple[int, dict[str, Any]]] = None

    def resume_at(self, batches: int, epoch_start: dict[str, Any]) -> None:
        """Make the next epoch skip its first ``batches``, its order drawn from ``epoch_start`` (which the
        uninterrupted epoch recorded)."""
        self._resume = (batches, epoch_start)

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is None:
            self.epoch_start = {"rng": capture_rng_states(), "generators": generator_states(self.generators)}
            yield from self.inner
            return
        skip, self.epoch_start = resume
        # The order is drawn again from the epoch's starting states; afterwards every generator is back where the
        # resumed run put it (the checkpoint's states), so the skipped part leaves no trace on them.
        with rng_states_set_to(self.epoch_start["rng"], self.generators, self.epoch_start["generators"]):
            iterator = iter(self.inner)
            for _ in range(skip):
                if next(iterator, _END) is _END:
                    return
        yield from iterator

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "generators", "epoch_start", "_resume"):
            raise AttributeError(name)
        return getattr(self.inner, name)


_END = object()


def is_stateful(loader: Any) -> bool:
    """Whether the loader keeps its own position (``state_dict``/``load_state_dict``, e.g. torchdata's
    ``StatefulDataLoader``); Lightning saves and restores it."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def is_replayable(loader: Any) -> bool:
    """Whether :class:`ReplayableIndexSampler` can position the loader: a plain map-style ``DataLoader``."""
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and not is_stateful(loader)
        and (loader.batch_sampler is not None or loader.sampler is not None)
    )


def sampler_generators(loader: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects a loader and its samplers hold, by attribute path (each object once)."""
    found: dict[str, torch.Generator] = {}

    def visit(obj: Any, path: str, depth: int) -> None:
        for attribute in ("generator", *_SAMPLER_ATTRIBUTES):
            value = getattr(obj, attribute, None)
            name = f"{path}{attribute}"
            if isinstance(value, torch.Generator):
                if all(value is not g for g in found.values()):
                    found[name] = value
            elif value is not None and value is not obj and depth < 3 and attribute != "generator":
                visit(value, name + ".", depth + 1)

    visit(loader, "", 0)
    return found


def install_replayable_sampler(loader: DataLoader) -> ReplayableIndexSampler:
    """Put a :class:`ReplayableIndexSampler` in place of the loader's index sampler (once)."""
    attribute = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    current = loader.__dict__[attribute]
    if isinstance(current, ReplayableIndexSampler):
        return current
    replayable = ReplayableIndexSampler(current, sampler_generators(loader))
    loader.__dict__[attribute] = replayable  # DataLoader.__setattr__ refuses this after __init__
    return replayable


def remove_replayable_sampler(loader: Any) -> None:
    """Give the loader its own index sampler back."""
    for attribute in _SAMPLER_ATTRIBUTES:
        current = getattr(loader, "__dict__", {}).get(attribute)
        if isinstance(current, ReplayableIndexSampler):
            loader.__dict__[attribute] = current.inner


def describe_sampler(loader: Any) -> dict[str, Any]:
    """What identifies the order of a loader's sampler besides random states: its type and, for a
    ``DistributedSampler``, its epoch, seed, rank and replica count."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    inner = getattr(sampler, "inner", sampler)
    found = {"type": type(inner).__name__}
    for attribute in ("epoch", "seed", "rank", "num_replicas", "shuffle"):
        value = getattr(inner, attribute, None)
        if isinstance(value, (bool, int)):
            found[attribute] = value
    return found

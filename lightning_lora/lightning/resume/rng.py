"""Random number generator states: capture them all, restore them all.

The states a training run draws from: Python's ``random``, NumPy's global generator, torch's CPU generator, every
initialised CUDA device's generator, and explicit ``torch.Generator`` objects (a DataLoader's or sampler's). A
snapshot is a dict of tensors, tuples and numbers, so it is written into a checkpoint and read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
    np = None  # type: ignore[assignment]


def capture_rng_states() -> dict[str, Any]:
    """The global generators' states now: ``python``, ``numpy`` (when installed), ``torch`` and ``cuda`` (one state
    per device, only once CUDA is initialised; reading it never initialises CUDA)."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        name, keys, position, has_gauss, cached = np.random.get_state()
        states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global generators to a snapshot of :func:`capture_rng_states` (parts it lacks stay as they are)."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states and np is not None:
        name, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        cuda = list(states["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def generator_states(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """``{name: state}`` of named ``torch.Generator`` objects."""
    return {name: generator.get_state() for name, generator in generators.items()}


def restore_generator_states(generators: Mapping[str, torch.Generator], states: Mapping[str, torch.Tensor]) -> None:
    """Set each named generator that has a saved state to it."""
    for name, generator in generators.items():
        if name in states:
            generator.set_state(states[name])


@contextmanager
def rng_states_set_to(
    states: Mapping[str, Any], generators: Mapping[str, torch.Generator], generator_saved: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block, the global generators hold ``states`` and the named ``generators`` ``generator_saved``;
    afterwards every one of them is back where it was before the block."""
    before, generators_before = capture_rng_states(), generator_states(generators)
    restore_rng_states(states)
    restore_generator_states(generators, generator_saved)
    try:
        yield
    finally:
        restore_rng_states(before)
        restore_generator_states(generators, generators_before)

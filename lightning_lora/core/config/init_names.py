"""The names ``LoraConfig.init`` accepts: a leaf registry, filled by
:func:`~lightning_lora.core.inits.initializers.register_initializer`, so that configs can check a name without
importing the initialisers (which sit above them)."""

from __future__ import annotations

import re

_NAMES: set[str] = set()
_PREFIXES: set[str] = set()  # numbered families, e.g. "pissa_niter_" accepts "pissa_niter_4"
_DATA_NAMES: set[str] = set()  # methods that read calibration batches (CorDA, EVA)


def register_init_name(name: str, numbered: bool = False, needs_data: bool = False) -> None:
    """Accept ``name`` (or, with ``numbered``, ``name`` followed by an integer) as an init method; ``needs_data``:
    the method reads calibration batches."""
    (_PREFIXES if numbered else _NAMES).add(name)
    if needs_data:
        _DATA_NAMES.add(name)


def is_data_init(init: object) -> bool:
    """Whether ``init`` (any kind's init field value) names a method that reads calibration batches."""
    return isinstance(init, str) and init in _DATA_NAMES


def check_init_name(init: str) -> None:
    """Raise a ValueError naming the valid choices when ``init`` is not a registered method."""
    if init in _NAMES or any(re.fullmatch(re.escape(prefix) + r"\d+", init) for prefix in _PREFIXES):
        return
    valid = sorted(_NAMES) + [f"{prefix}<K>" for prefix in sorted(_PREFIXES)]
    raise ValueError(f"Unknown init {init!r}; choose one of {valid}.")

"""Checks of the numbers users pass (config fields, schedule and optimizer arguments, combination weights).

A number is accepted only when it is a real, finite value of the right type: ``True`` is not a rank, and NaN or
infinity pass comparisons such as ``not x > 0`` or ``x >= 0`` that look like range checks. Each place that takes a
number states its range in its own error message; this module holds what those checks share.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (``int``, ``float`` or a NumPy scalar), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (or a NumPy integer), not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

"""The field rules every config uses: the ``"all-linear"`` target, bias modes, PEFT's pattern-key rule, value checks
that name the fix, and building a config from a dict."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

from lightning_lora.core.common.checks import is_finite_number

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")


def config_from_dict(cls: type, values: dict[str, Any], name: str) -> Any:
    """``cls(**values)``, unknown keys refused by name (``name`` is the config's name in the message)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {name} fields {unknown}; valid fields are {sorted(known)}.")
    return cls(**values)


def pattern_matches(module_name: str, key: str) -> bool:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern`` keys: the key (a regex) matches a dotted suffix of the
    module name (``peft.utils.other.get_pattern_key``)."""
    try:
        return re.match(rf"(.*\.)?({key})$", module_name) is not None
    except re.error:
        return False


def pattern_key(patterns: dict[str, Any], module_name: str) -> Optional[str]:
    """The first key of ``patterns`` that matches ``module_name`` (:func:`pattern_matches`), or None."""
    return next((key for key in patterns if pattern_matches(module_name, key)), None)


def check_dropout(name: str, value: Any) -> None:
    """Raise a ValueError unless ``value`` is a probability in ``[0, 1)``."""
    if not (is_finite_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}; use 0.0 to switch dropout off.")


def check_rank(name: str, value: Any) -> None:
    """Raise a ValueError unless ``value`` is an integer rank >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def check_alpha(name: str, value: Any) -> None:
    """Raise a ValueError unless ``value`` is a finite number > 0."""
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}; a common choice is alpha = 2 * r.")


def check_regex(name: str, pattern: str) -> None:
    """Raise a ValueError naming the entry unless ``pattern`` compiles."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {err}.") from err


def check_patterns(name: str, patterns: Union[list[str], str]) -> None:
    """Raise a ValueError unless ``patterns`` is a list of module names or one regex string (or ``"all-linear"``)."""
    if isinstance(patterns, str):
        if patterns != ALL_LINEAR:
            check_regex(name, patterns)
        return
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must be a list of non-empty module names or one regex string, got {patterns!r}.")

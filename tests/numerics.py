"""Numerical comparisons that hold on any machine.

Two implementations (ours and PEFT, a merged and an unmerged layer, one process and two) sum the same float32
products in different orders, and the order depends on the CPU's vector width, the BLAS kernel and the thread count.
A bare absolute tolerance on such a sum passes on one machine and fails on the next. The rule here:

- compare in float64 where both sides allow it (then a tight tolerance means something), or
- bound the largest difference relative to the largest magnitude of the compared tensors (a norm-wise bound: it
  scales with the numbers the sum produced, as float32 rounding does).

Either bound still fails on a real bug: a wrong scaling or a missing term moves a result by far more than a few ulps
of its largest element.
"""

from __future__ import annotations

import torch

# Largest difference allowed, as a fraction of the largest magnitude compared. float32 rounding of the sums in these
# tests is about 1e-7 of that magnitude (one ulp); 1e-5 leaves a hundredfold margin for other summation orders.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def tolerance(actual: torch.Tensor, expected: torch.Tensor, rel: float | None = None) -> float:
    """The absolute tolerance :func:`assert_parity` applies: ``rel`` times the largest magnitude of either tensor.

    Args:
        actual: The tensor under test.
        expected: The reference tensor.
        rel: The fraction of the largest magnitude allowed; default by the lower of the two dtypes' precision.
    """
    if rel is None:
        rel = max(RELATIVE_TOLERANCE.get(actual.dtype, 0.0), RELATIVE_TOLERANCE.get(expected.dtype, 0.0))
    scale = max(actual.detach().abs().max().item(), expected.detach().abs().max().item()) if expected.numel() else 0.0
    return rel * scale


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, rel: float | None = None, msg: str = "") -> None:
    """Assert ``actual`` equals ``expected`` up to rounding: no element differs by more than ``rel`` times the largest
    magnitude of the two tensors (``rel`` 1e-5 for float32, 1e-10 for float64 by default).

    Args:
        actual: The tensor under test.
        expected: The reference tensor (same shape; dtypes may differ, the comparison runs in float64).
        rel: The fraction of the largest magnitude allowed.
        msg: Said first when the assertion fails.
    """
    assert actual.shape == expected.shape, f"{msg} shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    bound = tolerance(actual, expected, rel)
    difference = (actual.detach().double() - expected.detach().double().to(actual.device)).abs()
    assert difference.isfinite().all(), f"{msg} non-finite values: {difference}"
    worst = difference.max().item() if difference.numel() else 0.0
    assert worst <= bound, (
        f"{msg} largest difference {worst:.3g} at {tuple(int(i) for i in divmod_index(difference))} exceeds "
        f"{bound:.3g} ({bound / max(tolerance(actual, expected, 1.0), 1e-300):.1g} of the largest magnitude)"
    )


def divmod_index(tensor: torch.Tensor) -> tuple[int, ...]:
    """The multi-dimensional index of ``tensor``'s largest element."""
    flat = int(tensor.argmax())
    index = []
    for size in reversed(tensor.shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))

"""Forward plans: whatever takes over an adapted layer's call for a while.

A mixed-adapter batch (each sample its own adapter), X-LoRA's gate (experts weighed per token) and AM-LoRA's selector
(tasks weighed per token) each decide, call by call, how a layer's adapters mix. Each is a plan: an object behind
this protocol in the layer's one slot, ``LoraLayer.forward_plan``. The generic layer knows no plan by name; a second
plan on a layer is refused, naming both; and generic operations (merging, merge on fit end) ask a plan what it
supports before they act, so an operation whose result would not be what the plan computes is refused by name
instead of silently computing something else.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

MERGE = "merge"  # fold the active adapters into the base weights: the plan's output stays what merged weights give


@runtime_checkable
class ForwardPlan(Protocol):
    """What takes over an adapted layer's call.

    Attributes:
        plan_name: How messages name it (``"X-LoRA's gate"``).
        removal: What takes it off again (``"call remove_xlora(model)"``), for messages.
        capabilities: The generic operations that keep their meaning under it (e.g. :data:`MERGE`).
    """

    plan_name: str
    removal: str
    capabilities: frozenset[str]

    def forward(
        self, layer: nn.Module, x: torch.Tensor, base_forward: Callable[..., torch.Tensor], args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """The layer's output for ``x``: ``base_forward(x, *args, **kwargs)`` plus what the plan adds."""
        ...


def plan_of(layer: nn.Module) -> ForwardPlan | None:
    """The plan ``layer`` computes through now, or None."""
    return layer.__dict__.get("forward_plan")


def check_free_for(layers: Iterable[tuple[str, nn.Module]], plan_name: str) -> None:
    """Raise, before anything changes, when one of ``layers`` already computes through a plan.

    Args:
        layers: ``(name, layer)`` pairs about to get a plan.
        plan_name: The plan about to be installed, for the message.

    Raises:
        ValueError: Naming the layer, both plans and how to take the present one off.
    """
    for name, layer in layers:
        present = plan_of(layer)
        if present is not None:
            raise ValueError(
                f"{name} already computes through {present.plan_name}; {plan_name} cannot take over its call too. "
                f"Take it off first: {present.removal}."
            )


def install_plan(layer: nn.Module, plan: ForwardPlan) -> None:
    """Put ``plan`` in ``layer``'s slot (checked free with :func:`check_free_for` beforehand)."""
    layer.forward_plan = plan


def remove_plan(layer: nn.Module, plan_type: type) -> None:
    """Empty ``layer``'s slot if it holds a plan of ``plan_type``."""
    if isinstance(plan_of(layer), plan_type):
        del layer.__dict__["forward_plan"]


def check_plans_allow(layers: Iterable[tuple[str, nn.Module]], operation: str, what: str) -> None:
    """Raise, before anything changes, when a layer's plan does not support ``operation``.

    Args:
        layers: ``(name, layer)`` pairs the operation acts on.
        operation: The capability asked for (e.g. :data:`MERGE`).
        what: The operation as the user called it, for the message (``"merge_lora"``).

    Raises:
        ValueError: Naming the layer, the plan, and how to take it off.
    """
    for name, layer in layers:
        plan: Any = plan_of(layer)
        if plan is not None and operation not in plan.capabilities:
            raise ValueError(
                f"{what} cannot act on {name}: it computes through {plan.plan_name}, which decides per call how its "
                f"adapters mix, so no merged weight computes what it does. Take it off first ({plan.removal}; the "
                "adapters stay), or keep the model unmerged and export the adapters with save_adapter."
            )

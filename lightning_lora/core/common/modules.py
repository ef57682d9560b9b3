"""Checks on the user's module tree before helper modules are added to it."""

from __future__ import annotations

from torch import nn


def check_takes_child(model: nn.Module, child: str, what: str) -> None:
    """Raise a ValueError naming the fix when ``model`` cannot hold a helper module as child ``child``: an
    ``nn.Sequential`` runs every child as a layer, so the helper would run as one.

    Args:
        model: The model about to get the child.
        child: The child's attribute name.
        what: The feature adding it, for the message.
    """
    if isinstance(model, nn.Sequential):
        raise ValueError(
            f"{what} adds model.{child} as a child module, and an nn.Sequential runs every child as a layer. Wrap the "
            "Sequential in a module of your own (self.body = sequential; forward returns self.body(x)) and pass that."
        )

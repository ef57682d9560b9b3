r"""
Module hooks
============

A callback that must act right after one of the LightningModule's own hooks (``configure_model``: the model may be
built there, out of a callback's sight; ``on_train_end``: after every callback's) binds a wrapper onto the module
instance. Written once here, for every callback that needs it:

- A plain function bound with ``MethodType``, not ``functools.wraps``: ``is_overridden`` follows ``__wrapped__`` and
  Lightning would then skip the hook. Bound, not a closure over the module, so ``copy.deepcopy(module)`` calls the
  copy.
- The wrapper acts only while the module's Trainer holds the callback, and the callback removes it at its teardown:
  a later fit of the same module instance under another Trainer (with another callback, or none) does what that
  Trainer says and nothing else.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import lightning.pytorch as pl

Action = Callable[[pl.LightningModule], object]


def run_after_module_hook(pl_module: pl.LightningModule, hook_name: str, owner: Any, action: Action) -> None:
    """Make ``pl_module.<hook_name>()`` run ``action(pl_module)`` right after the module's own hook, while the
    module's Trainer holds ``owner``. Once per owner and hook.

    Args:
        pl_module: The module whose hook is chained.
        hook_name: The hook, e.g. ``"configure_model"``.
        owner: The callback the action belongs to.
        action: What runs after the hook.
    """
    current = getattr(pl_module, hook_name)
    if any(link._owner is owner for link in _links(current)):
        return
    _bind(pl_module, hook_name, current, owner, action)


def check_present_at_fit_start(present: bool, what: str) -> None:
    """Raise when what a callback added to the model (in ``setup`` or after ``configure_model``) is gone at fit start.

    Args:
        present: Whether it is still there.
        what: What is missing, for the message (``"The LoRA adapter 'default'"``).

    Raises:
        RuntimeError: ``configure_model`` replaced the model after it was added.
    """
    if not present:
        raise RuntimeError(
            f"{what} is missing at fit start: configure_model replaced the model after it was added. Make "
            "configure_model idempotent (return early when the model exists)."
        )


def remove_module_hooks(pl_module: pl.LightningModule, owner: Any) -> None:
    """Undo every :func:`run_after_module_hook` of ``owner`` on ``pl_module``; other owners' links stay, in order.

    Args:
        pl_module: The module.
        owner: The callback whose links go.
    """
    for hook_name, value in list(vars(pl_module).items()):
        links = _links(value)
        if not any(link._owner is owner for link in links):
            continue
        base = links[-1]
        if not base._takes_module:
            setattr(pl_module, hook_name, base._inner)  # a callable set on the instance from outside
        elif getattr(type(pl_module), hook_name, None) is base._inner:
            delattr(pl_module, hook_name)  # the class's own hook again
        else:
            setattr(pl_module, hook_name, MethodType(base._inner, pl_module))
        for link in reversed(links):
            if link._owner is not owner:
                _bind(pl_module, hook_name, getattr(pl_module, hook_name), link._owner, link._action)


def _bind(pl_module: pl.LightningModule, hook_name: str, current: Any, owner: Any, action: Action) -> None:
    # The module's own hook (a method bound to this instance) is kept as its function and called with the module it
    # runs on; a callable set on the instance from outside is called as it is.
    takes_module = isinstance(current, MethodType) and current.__self__ is pl_module
    inner = current.__func__ if takes_module else current

    def hook(module: pl.LightningModule) -> None:
        if takes_module:
            inner(module)
        else:
            inner()
        trainer = module._trainer
        if trainer is not None and any(callback is owner for callback in trainer.callbacks):
            action(module)

    hook._owner, hook._action, hook._inner, hook._takes_module = owner, action, inner, takes_module  # type: ignore
    setattr(pl_module, hook_name, MethodType(hook, pl_module))


def _links(value: Any) -> list[Any]:
    """The chain of wrappers under ``value``, outermost first (empty for a hook nobody chained)."""
    links = []
    function = value.__func__ if isinstance(value, MethodType) else value
    while hasattr(function, "_owner"):
        links.append(function)
        function = function._inner
    return links

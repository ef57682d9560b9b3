r"""
X-LoRA callback
===============

Turns the model of a ``Trainer`` run into an X-LoRA mixture of LoRA experts at setup (loading the experts' files
first when given), so that training fits the gate's classifier, and keeps checkpoints down to what trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_lora.core.composition.xlora import add_xlora, has_xlora, xlora_experts
from lightning_lora.core.composition.xlora_classifier import XLoraConfig
from lightning_lora.core.files.adapter_files import load_adapter
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.layers.summary import trainable_parameters_summary
from lightning_lora.lightning.callback import LoraCallback
from lightning_lora.lightning.checkpoint import patch_strategy_checkpointing, remember_adapter_shapes
from lightning_lora.lightning.fit_support import check_optimizer_holds_trainable_parameters, submodule_of
from lightning_lora.lightning.module_hooks import (
    check_present_at_fit_start,
    remove_module_hooks,
    run_after_module_hook,
)
from lightning_lora.lightning.resume import attach_exact_resume


class XLoraCallback(Callback):
    r"""Train an X-LoRA gate over LoRA experts: load the experts, add the gate, checkpoint only what trains.

    At :meth:`setup` (or right after ``configure_model`` when the module builds its model there) the experts are
    loaded from their folders (those the model does not hold yet) and :func:`~lightning_lora.add_xlora` runs; it is
    idempotent across ``fit``/``validate``/``test``/``predict``. Checkpoints hold the experts' tensors and every
    trainable parameter (the classifier ``xlora_classifier``), plus the optimizer and loop state; resuming restores
    them exactly. At fit start the optimizer is checked to hold every trainable tensor and no frozen one.

    Args:
        experts: The experts in order: ``{adapter name: folder}`` (PEFT or lightning_lora files) to load, or the
            names of adapters the model already has.
        config: The X-LoRA config (default ``XLoraConfig()``).
        hidden_states: The module whose output the classifier reads (see :func:`~lightning_lora.add_xlora`);
            None for Hugging Face models.
        submodule: Attribute path of the model inside the LightningModule (``"model"``); default: the
            LightningModule itself. X-LoRA runs its scalings pass when this module is called, so name the module
            your steps call (``self.model(...)``: ``"model"``).
        adapter_only_checkpoints: Keep checkpoints down to the experts and what trains. False: full checkpoints.
        check_optimizer: Raise at fit start when the optimizer misses trainable tensors or holds frozen ones.
        exact_resume: Add an :class:`~lightning_lora.ExactResume` to the Trainer (unless it has one) when fitting,
            as ``LoraCallback`` does: checkpoints resume exactly (data position and random states, the classifier's
            dropout included). False: checkpoints resume as Lightning alone resumes them.

    Raises:
        TypeError: ``config`` is not an ``XLoraConfig``.
        ValueError: No experts, or an invalid ``submodule``.

    Example::

        xlora = XLoraCallback({"math": "experts/math", "code": "experts/code"}, XLoraConfig(xlora_depth=2),
                              submodule="model")
        L.Trainer(callbacks=[xlora], max_steps=1000).fit(CausalLM(), data)  # trains model.xlora_classifier
    """

    def __init__(
        self,
        experts: Union[Mapping[str, Union[str, Path]], Sequence[str]],
        config: Optional[XLoraConfig] = None,
        hidden_states: Optional[str] = None,
        submodule: Optional[str] = None,
        adapter_only_checkpoints: bool = True,
        check_optimizer: bool = True,
        exact_resume: bool = True,
    ) -> None:
        config = XLoraConfig() if config is None else config
        if not isinstance(config, XLoraConfig):
            raise TypeError(f"config must be an XLoraConfig, got {type(config).__name__}.")
        if isinstance(experts, str) or not experts:
            raise ValueError(f"experts must be a list of adapter names or a {{name: folder}} mapping, got {experts!r}.")
        if submodule is not None and (not isinstance(submodule, str) or not submodule):
            raise ValueError(f"submodule must be an attribute path such as 'model', got {submodule!r}.")
        self.expert_dirs = {name: Path(path) for name, path in experts.items()} if isinstance(experts, Mapping) else {}
        self.experts = list(experts)
        self.config = config
        self.hidden_states = hidden_states
        self.submodule = submodule
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.check_optimizer = check_optimizer
        self.exact_resume = exact_resume

    def target(self, pl_module: pl.LightningModule) -> Optional[nn.Module]:
        """The model X-LoRA goes on (``submodule`` of ``pl_module``), or None while it does not exist."""
        return submodule_of(pl_module, self.submodule)

    def apply(self, pl_module: pl.LightningModule) -> bool:
        """Load the missing experts and add X-LoRA now, unless it is already there. Returns whether it was added.

        Raises:
            ValueError: The model does not exist, or X-LoRA is on it with other experts (and what
                :func:`~lightning_lora.add_xlora` and :func:`~lightning_lora.load_adapter` refuse).
        """
        target = self.target(pl_module)
        if target is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no module at {self.submodule!r} for X-LoRA; build it in __init__ or "
                "configure_model, or fix XLoraCallback(submodule=...)."
            )
        if has_xlora(target):
            if xlora_experts(target) != self.experts:
                raise ValueError(
                    f"The model already has X-LoRA over {xlora_experts(target)}, not {self.experts}; call "
                    "remove_xlora(model) first or give the callback the same experts."
                )
            return False
        known = adapter_names(target)
        for name, directory in self.expert_dirs.items():
            if name not in known:
                load_adapter(target, directory, adapter_name=name)
        add_xlora(target, self.experts, self.config, hidden_states=self.hidden_states)
        remember_adapter_shapes(pl_module)
        return True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not is_overridden("configure_model", pl_module) or self.target(pl_module) is not None:
            self.apply(pl_module)
        else:
            run_after_module_hook(pl_module, "configure_model", self, self.apply)
        patch_strategy_checkpointing(trainer.strategy, _checkpointing_callbacks)
        if self.exact_resume:
            attach_exact_resume(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_module_hooks(pl_module, self)  # X-LoRA stays in the module; this callback's hooks end with its Trainer

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        check_present_at_fit_start(target is not None and has_xlora(target), "X-LoRA")
        if self.check_optimizer:
            check_optimizer_holds_trainable_parameters(trainer, pl_module)
        rank_zero_info(f"X-LoRA over {self.experts}: {trainable_parameters_summary(pl_module)}")

    @property
    def adapter_name(self) -> str:
        """How checkpoint checks name what this callback trains."""
        return "X-LoRA gate"

    @override
    def state_dict(self) -> dict[str, Any]:
        # "kind" and "config" are what the checkpoint loading checks compare before anything is loaded.
        return {"kind": self.config.kind, "config": self.config.to_dict(), "experts": list(self.experts)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("experts")
        if saved is not None and saved != self.experts:
            raise ValueError(
                f"The checkpoint's X-LoRA gate was trained over the experts {saved}, in this order, not "
                f"{self.experts}; resume with the same experts in the same order."
            )


def _checkpointing_callbacks(pl_module: pl.LightningModule) -> list[Any]:
    """The callbacks whose ``adapter_only_checkpoints`` decide the checkpoints: every LoRA and X-LoRA callback."""
    trainer = pl_module._trainer
    if trainer is None:
        return []
    return [c for c in trainer.callbacks if isinstance(c, (LoraCallback, XLoraCallback))]

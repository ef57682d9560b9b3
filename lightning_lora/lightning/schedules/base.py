"""The base of callbacks that change adapters while a ``Trainer`` fits (AdaLoRA's budget, ReLoRA, DyLoRA, ...).

In the manner of Lightning's ``BaseFinetuning``: a schedule acts at fixed moments of the loop and nothing in the
user's ``training_step`` changes. What every schedule gets from here:

- It finds its adapter's layers at fit start and refuses, before any training step, a model without an adapter of
  the right kind (also the kind's config checks against the run: a step count, a strategy).
- :meth:`AdapterSchedule.after_optimizer_step` runs once per optimizer step (not per micro-batch under gradient
  accumulation), after the step and before gradients are zeroed, with the 0-based index of that step. The metrics
  it returns go to the Trainer's loggers.
- ``state_dict`` / ``load_state_dict`` carry the schedule's own state in checkpoints; a resumed run restores it at
  train start (after every strategy has restored the model), so the schedule continues exactly.
- Decisions are taken from values that are equal on every rank (reduced gradients, gathered shards), so every rank
  takes the same ones under DDP and FSDP2.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_lora.core.common.base_weights import is_plain_weight
from lightning_lora.core.kinds import AdapterKind, kind_of
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config
from lightning_lora.core.training.base_updates import mark_base_trained
from lightning_lora.lightning.callback import lora_callbacks
from lightning_lora.lightning.export import AdapterExport


class AdapterSchedule(Callback):
    """Base class of training-time adapter algorithms.

    Subclasses set :attr:`works_on` and :meth:`accepts`, and override :meth:`start`, :meth:`after_optimizer_step`,
    :meth:`schedule_state` and :meth:`restore_state` as they need.

    Args:
        adapter_name: The adapter the schedule acts on.
    """

    #: What the schedule works on, for the error that refuses other adapters (see :meth:`accepts`).
    works_on: ClassVar[str] = "LoRA factors (plain LoRA, not DoRA)"
    #: How metrics are prefixed in the loggers.
    metric_prefix: ClassVar[str] = "schedule"

    def __init__(self, adapter_name: str = "default") -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
        self.adapter_name = adapter_name
        self.layers: list[tuple[str, LoraLayer]] = []
        self._steps_seen = 0
        self._loaded_state: Optional[dict[str, Any]] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)

    # ----- the model -----
    def adapted_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module the adapter was added to: the ``LoraCallback``'s ``submodule``, else ``pl_module``."""
        for callback in lora_callbacks(pl_module):
            if callback.adapter_name == self.adapter_name and callback.target(pl_module) is not None:
                return callback.target(pl_module)
        return pl_module

    def _find_layers(self, pl_module: pl.LightningModule) -> None:
        module = self.adapted_module(pl_module)
        name = type(self).__name__
        if self.adapter_name not in adapter_names(module):
            raise ValueError(
                f"{name} acts on adapter {self.adapter_name!r}, but the model has "
                f"{adapter_names(module) or 'no adapters'}. Add it with LoraCallback(config, "
                f"adapter_name={self.adapter_name!r}) (or LoraMixin), or set {name}(adapter_name=...)."
            )
        kind = kind_of(get_lora_config(module, self.adapter_name))
        if not self.accepts(kind):
            raise ValueError(
                f"{name} works on {self.works_on}; adapter {self.adapter_name!r} is a {kind.display_name} adapter. "
                "Train it with the matching config class, or drop the schedule."
            )
        self.layers = [(n, layer) for n, layer in lora_layers(module) if self.adapter_name in layer.lora_settings]

    # ----- what subclasses provide -----
    def accepts(self, kind: AdapterKind) -> bool:
        """Whether the schedule can act on adapters of ``kind``, asked through what the kind declares (default: its
        update is ``scaling * B A`` of LoRA factors)."""
        return kind.lora_factors

    def check_trainer(self, trainer: pl.Trainer) -> None:
        """Raise a ValueError naming the fix when the schedule cannot run with this Trainer (called at setup)."""
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ValueError(
                f"{type(self).__name__} reads and changes adapter tensors between steps, which DeepSpeed keeps in its "
                "own partitioned copies. Use DDP or FSDP2 (ModelParallelStrategy) for this schedule."
            )

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit start, after the layers are found: check the run and build what the schedule needs."""

    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        """Act after optimizer step ``step`` (0-based); return metrics for the loggers."""
        return {}

    def schedule_state(self) -> dict[str, Any]:
        """The schedule's state for checkpoints (tensors and plain values)."""
        return {}

    def restore_state(self, state: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore :meth:`schedule_state` from a checkpoint (at train start)."""

    def check_saved_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if this schedule cannot resume a checkpoint's state; runs before anything loads.

        Args:
            state: The state this schedule's :meth:`state_dict` wrote into the checkpoint.
        """

    # ----- hooks -----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_trainer(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._find_layers(pl_module)
        self.start(trainer, pl_module)

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_loaded_state(trainer, pl_module)  # a resumed run's sanity check sees the restored model

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_seen = trainer.global_step
        self._restore_loaded_state(trainer, pl_module)

    def _restore_loaded_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            self.restore_state(state, trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._steps_seen:
            return  # gradient accumulation: no optimizer step yet
        self._steps_seen = trainer.global_step
        metrics = self.after_optimizer_step(trainer, pl_module, trainer.global_step - 1)
        if metrics:
            prefixed = {f"{self.metric_prefix}/{key}": float(value) for key, value in metrics.items()}
            pl_module.log_dict(prefixed, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"adapter_name": self.adapter_name, **self.schedule_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)


class BaseMovingSchedule(AdapterSchedule):
    """A schedule that also changes the base weights of its adapter's layers (ReLoRA, Delta-LoRA).

    At fit start it refuses what cannot hold the result (quantised base weights, an :class:`AdapterExport` of the
    adapter: an adapter file against the original base would not reproduce the model) and marks the layers, so
    adapter files are refused later too and checkpoints keep what the base needs.
    """

    #: The algorithm's name, for messages.
    algorithm: ClassVar[str] = ""
    #: Adapter-only checkpoints keep the whole weights of the adapted layers (False: the schedule keeps a record).
    checkpoint_weights: ClassVar[bool] = False

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(c, AdapterExport) and c.adapter_name == self.adapter_name for c in trainer.callbacks):
            raise ValueError(
                f"{self.algorithm} changes the base weights, so an adapter file of {self.adapter_name!r} "
                "(AdapterExport) would not reproduce the trained model. Drop AdapterExport and export the merged "
                "model: LoraCallback(merge_on_fit_end=True, merged_weights_dir=...)."
            )
        quantised = [name for name, layer in self.layers if not is_plain_weight(layer)]
        if quantised:
            raise ValueError(
                f"{self.algorithm} adds updates to the base weights, but {quantised[:3]} are quantised (QLoRA): the "
                "updates would be rounded away. Load the base in floating point for this schedule."
            )
        for _, layer in self.layers:
            mark_base_trained(layer, self.adapter_name, self.algorithm, self.checkpoint_weights)


def warn_beyond_run(trainer: pl.Trainer, step: int, what: str) -> None:
    """Warn, giving the run's length, when optimizer step ``step`` (0-based) is past the last step of the run, so
    that what the user set (``what``, e.g. ``"start_step=500: Delta-LoRA"``) never happens. Runs whose length the
    Trainer cannot tell (no ``max_steps`` and an unsized loader) are not checked."""
    total = trainer.estimated_stepping_batches
    if math.isfinite(total) and step >= total:
        rank_zero_warn(
            f"{what} acts at optimizer step {step}, but this run has {int(total)} optimizer step(s), so it never "
            "does. Train longer (max_steps / max_epochs) or lower the setting."
        )


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, for checkpointed schedule state."""
    return {key: value.detach().to("cpu", copy=True) for key, value in tensors.items()}

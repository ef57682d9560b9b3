r"""
LoRA mixin
==========

A LightningModule that trains with LoRA from its own init arguments: the adapter config, the optimizer and
scheduler as callables (so LightningCLI can build it from YAML), LoRA+ and LoRA-FA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.kinds import AnyAdapterConfig
from lightning_lora.core.training.param_groups import check_loraplus_arguments, lora_param_groups
from lightning_lora.lightning.callback import LoraCallback
from lightning_lora.lightning.checkpoint import check_and_complete_checkpoint


class LoraMixin:
    r"""Mixin for a ``LightningModule`` that trains LoRA adapters; put it first among the bases.

    It attaches a :class:`~lightning_lora.LoraCallback` through ``configure_callbacks`` (injection at the right
    moment, adapter-only checkpoints, the optimizer check, merging) and provides ``configure_optimizers``: parameter
    groups from :func:`~lightning_lora.lora_param_groups` (LoRA+ learning rates, no weight decay on biases, norms and
    DoRA magnitudes), the optimizer built by ``optimizer`` and, optionally, a scheduler. The learning rate and weight
    decay are those the ``optimizer`` callable is configured with. ``load_from_checkpoint`` adds the adapter before
    loading an adapter-only checkpoint.

    With LightningCLI use ``auto_configure_optimizers=False``: the CLI's automatic optimizer is built before the
    adapters exist. A ``LoraCallback`` given to the Trainer as well is replaced by the module's (Lightning's rule for
    ``configure_callbacks``); a subclass that overrides ``configure_callbacks`` must include ``super()``'s.

    Args:
        lora_config: What to adapt and how; default ``LoraConfig()`` (r=8 on every linear layer but the head).
        optimizer: Builds the optimizer from parameter groups, e.g. ``functools.partial(torch.optim.AdamW, lr=2e-4)``
            or, in YAML, ``{class_path: torch.optim.AdamW, init_args: {lr: 2e-4}}``. Its ``lr`` and
            ``weight_decay`` set the groups' values.
        scheduler: Builds a learning-rate scheduler from the optimizer (optional).
        scheduler_interval: Step the scheduler every ``"epoch"`` (Lightning's default) or every ``"step"``.
        loraplus_lr_ratio: LoRA+: ``B`` matrices and DoRA magnitudes train at ``lr * loraplus_lr_ratio``.
        loraplus_lr_embedding: LoRA+: learning rate of embedding adapters (default ``1e-6``).
        lora_fa: LoRA-FA: freeze the ``A`` matrices at their init, train ``B`` only.
        adapter_name: Name of the adapter.
        submodule: Attribute path of the module to adapt (``"model"``); default: the whole LightningModule.
        adapter_only_checkpoints: Keep checkpoints down to what trains. False: full checkpoints.
        merge_on_fit_end: Merge the adapter into the base weights when training ends.
        merged_weights_dir: With ``merge_on_fit_end``, also write the merged weights to
            ``<dir>/model.safetensors``.
        calibration_batches: For a data-driven init (CorDA, EVA): how many train batches it reads at train start
            (see :class:`~lightning_lora.LoraCallback`).
        \**kwargs: Passed on to the next class in the MRO (``LightningModule``).

    Raises:
        TypeError: ``LoraMixin`` after ``LightningModule`` among the bases, or a ``lora_config`` that is not a
            ``LoraConfig``.
        ValueError: An invalid LoRA+ setting, ``scheduler_interval`` or ``adapter_name``.

    Example::

        import functools
        import lightning as L
        import torch
        from lightning_lora import LoraConfig, LoraMixin

        class Regression(LoraMixin, L.LightningModule):
            def __init__(self, **lora_arguments):
                super().__init__(**lora_arguments)
                self.model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.mse_loss(self.model(x), y)

        module = Regression(
            lora_config=LoraConfig(r=4, alpha=8, target_modules=["model.0"]),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
            loraplus_lr_ratio=16,
        )
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8
        )
        L.Trainer(max_epochs=1).fit(module, data)
    """

    def __init__(
        self,
        lora_config: Optional[AnyAdapterConfig] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        loraplus_lr_ratio: Optional[float] = None,
        loraplus_lr_embedding: Optional[float] = None,
        lora_fa: bool = False,
        adapter_name: str = "default",
        submodule: Optional[str] = None,
        adapter_only_checkpoints: bool = True,
        merge_on_fit_end: bool = False,
        merged_weights_dir: Optional[Union[str, Path]] = None,
        calibration_batches: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}.")
        self.lora_callback = LoraCallback(
            LoraConfig() if lora_config is None else lora_config,
            adapter_name=adapter_name,
            submodule=submodule,
            lora_fa=lora_fa,
            adapter_only_checkpoints=adapter_only_checkpoints,
            merge_on_fit_end=merge_on_fit_end,
            merged_weights_dir=merged_weights_dir,
            calibration_batches=calibration_batches,
        )
        check_loraplus_arguments(loraplus_lr_ratio, loraplus_lr_embedding)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if pl.LightningModule in mro and mro.index(pl.LightningModule) < mro.index(LoraMixin):
            raise TypeError(
                f"{cls.__name__} lists LightningModule before LoraMixin; put the mixin first: "
                f"class {cls.__name__}(LoraMixin, L.LightningModule)."
            )

    @property
    def lora_config(self) -> AnyAdapterConfig:
        """The adapter's config (``LoraConfig`` or another kind's)."""
        return self.lora_callback.config

    def configure_callbacks(self) -> list[Callback]:
        """The module's callbacks with its :class:`LoraCallback` added (call ``super()`` when overriding)."""
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        return [*callbacks, self.lora_callback]

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The optimizer over :func:`~lightning_lora.lora_param_groups`, with the scheduler if one is set.

        Raises:
            ValueError: The optimizer callable has no positive default learning rate.
        """
        lr, weight_decay = optimizer_defaults(self.optimizer)
        groups = lora_param_groups(
            self,  # type: ignore[arg-type]
            lr=lr,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_lr_embedding=self.loraplus_lr_embedding,
            weight_decay=weight_decay,
        )
        optimizer = self.optimizer(groups)
        if self.scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler(optimizer), "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}  # type: ignore[return-value]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """For ``load_from_checkpoint``: add the adapter, check the checkpoint fits it, and complete an adapter-only
        checkpoint with the model's frozen tensors so it loads strictly. (In a Trainer run the LoraCallback has done
        this already.)"""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        if self._trainer is not None:  # type: ignore[attr-defined]
            return
        module: pl.LightningModule = self  # type: ignore[assignment]
        self.lora_callback.inject(module)
        self.lora_callback.adopt_checkpoint_config(module, checkpoint.get("callbacks", {}))  # EVA's ranks
        check_and_complete_checkpoint(module, checkpoint, [self.lora_callback], "given to load_from_checkpoint")


def optimizer_defaults(optimizer: OptimizerCallable) -> tuple[float, float]:
    """``(lr, weight_decay)`` an optimizer callable is configured with, read from a throwaway instance.

    Args:
        optimizer: Builds an optimizer from parameters (LightningCLI's ``OptimizerCallable``).

    Raises:
        ValueError: The optimizer has no positive default learning rate.
    """
    probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    lr = probe.defaults.get("lr")
    lr = float(lr) if isinstance(lr, (int, float, torch.Tensor)) and not isinstance(lr, bool) else None
    if lr is None or not (math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"The optimizer {type(probe).__name__} has no positive default learning rate (got {lr!r}; it must be "
            "finite and > 0); configure one, e.g. "
            "optimizer=functools.partial(torch.optim.AdamW, lr=1e-4) or init_args: {lr: 1e-4} in YAML."
        )
    return lr, float(probe.defaults.get("weight_decay", 0.0))

"""The LoRA callback: adds adapters to the model of a ``Trainer`` run at the right moment, freezes the base model,
keeps checkpoints down to the adapters, and can merge the adapters into the base weights when training ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_lora.core.common.distributed import is_sharded, reshard_fsdp2
from lightning_lora.core.kinds import CONFIG_CLASSES, AnyAdapterConfig, kind_of
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config
from lightning_lora.core.layers.adapter_tensors import adapter_parameters, register_zero3_external_parameters
from lightning_lora.core.layers.forward_plan import MERGE, check_plans_allow
from lightning_lora.core.layers.summary import trainable_parameters_summary
from lightning_lora.core.quantization.quantized_weights import check_sharded_quantization, quantized_layers
from lightning_lora.core.surgery.inject import apply_lora, check_adapter_name, initialize_pending_adapters
from lightning_lora.core.targets.targeting import find_targets
from lightning_lora.core.training.param_groups import freeze_lora_A
from lightning_lora.lightning.calibration import CalibrationForward, DataInitHooks, pending_data_layers, uses_data_init
from lightning_lora.lightning.checkpoint import patch_strategy_checkpointing, remember_adapter_shapes
from lightning_lora.lightning.fit_support import (
    check_optimizer_holds_trainable_parameters,
    check_writable_destination,
    full_parameters_of,
    is_merged_into,
    is_zero3,
    merge_at_fit_end,
    refresh_optimizer_copies,
    submodule_of,
    unmerge_after_last_fit,
)
from lightning_lora.lightning.module_hooks import (
    check_present_at_fit_start,
    remove_module_hooks,
    run_after_module_hook,
)
from lightning_lora.lightning.precision import keep_adapters_float32
from lightning_lora.lightning.resume import attach_exact_resume


class LoraCallback(DataInitHooks, Callback):
    r"""Train a model with LoRA adapters: inject them, freeze the base, checkpoint only what trains.

    When the adapters are added:

    - A model built in ``__init__``: in :meth:`setup`, before ``configure_model`` (so a ``fully_shard`` there shards
      the adapters with their layers).
    - A model built in ``configure_model``: right after it, before the strategy wraps the model (DDP, FSDP,
      DeepSpeed) and before ``configure_optimizers``. If ``configure_model`` also shards the model (FSDP2), call
      :func:`inject_adapters` inside it before ``fully_shard``.

    Adding is idempotent: ``fit``, ``validate``, ``test``, ``predict`` and repeated ``fit`` calls reuse the adapter.
    Inits that read the base weights (SVD inits) run at stage start, after the strategy has materialised the model,
    for the adapters no checkpoint restored; data-driven inits (CorDA, EVA) read ``calibration_batches`` train
    batches at train start (:mod:`lightning_lora.lightning.calibration`). At fit start the trainable-parameter summary
    is printed (rank 0) and the optimizer is checked: it must hold every trainable tensor and no frozen one.

    Checkpoints hold what trains (adapters, ``modules_to_save``, trained biases) with the optimizer and loop state,
    also as sharded checkpoints, and loading one checks the adapter's tensors and config first. docs/lightning.md
    says what happens when under each strategy.

    Args:
        config: What to adapt and how.
        adapter_name: Name of the adapter.
        submodule: Attribute path of the module to adapt inside the LightningModule (``"model"``); default: the
            whole LightningModule. Merged weights are written with this module's state-dict keys.
        lora_fa: LoRA-FA: freeze the ``A`` matrices at their init, train ``B`` only.
        adapter_only_checkpoints: Keep checkpoints down to what trains. False: full checkpoints.
        check_optimizer: Raise at fit start when the optimizer misses trainable tensors or holds frozen ones.
        merge_on_fit_end: When training ends, merge the adapter into the base weights (the model stays merged; a
            later ``fit`` unmerges it first). The merge runs after every callback's ``on_train_end`` (so
            ``ModelCheckpoint``'s last checkpoint holds the unmerged model) and before the strategy's teardown.
        merged_weights_dir: With ``merge_on_fit_end``, also write the model as it computes at fit end, with every
            active adapter merged (other callbacks' too, and O-LoRA's earlier tasks), to this directory as a merged
            export (:func:`~lightning_lora.save_merged_model`: ``model.safetensors`` or shards, the ``submodule``'s
            keys without adapter tensors, ``config.json`` for Hugging Face models), from rank 0, gathered when the
            model is sharded. Checked writable at fit start.
        calibration_batches: How many train batches a data-driven init reads (required with one, refused without).
        calibration_forward: ``forward(pl_module, batch)`` running one calibration batch; default: the module's
            ``training_step`` with logging off (required under manual optimization).
        exact_resume: Add an :class:`~lightning_lora.ExactResume` to the Trainer (unless it has one) when fitting:
            checkpoints then resume exactly from any step (data position and random states) and are written
            atomically. False: checkpoints resume as Lightning alone resumes them.

    Raises:
        TypeError: ``config`` is not a ``LoraConfig``.
        ValueError: An invalid ``adapter_name``, ``merged_weights_dir`` without ``merge_on_fit_end``, or
            ``calibration_batches`` missing for a data-driven init (or given without one).

    Example::

        import lightning as L
        import torch
        from lightning_lora import LoraCallback, LoraConfig, lora_param_groups

        class Regression(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.mse_loss(self.model(x), y)

            def configure_optimizers(self):
                return torch.optim.AdamW(lora_param_groups(self, lr=1e-3))

        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8
        )
        lora = LoraCallback(LoraConfig(r=4, alpha=8, target_modules=["model.0"]))
        L.Trainer(callbacks=[lora], max_epochs=1).fit(Regression(), data)  # trains the adapter on model.0 only
    """

    def __init__(
        self,
        config: AnyAdapterConfig,
        adapter_name: str = "default",
        submodule: Optional[str] = None,
        lora_fa: bool = False,
        adapter_only_checkpoints: bool = True,
        check_optimizer: bool = True,
        merge_on_fit_end: bool = False,
        merged_weights_dir: Optional[Union[str, Path]] = None,
        calibration_batches: Optional[int] = None,
        calibration_forward: Optional[CalibrationForward] = None,
        exact_resume: bool = True,
    ) -> None:
        if not isinstance(config, CONFIG_CLASSES):
            raise TypeError(
                f"config must be a LoraConfig or another kind's config "
                f"({', '.join(c.__name__ for c in CONFIG_CLASSES[1:])}), got {type(config).__name__}; build one with "
                "LoraConfig(r=..., target_modules=[...])."
            )
        check_adapter_name(adapter_name)
        if submodule is not None and (not isinstance(submodule, str) or not submodule):
            raise ValueError(f"submodule must be an attribute path such as 'model', got {submodule!r}.")
        if merged_weights_dir is not None and not merge_on_fit_end:
            raise ValueError("merged_weights_dir is only written with merge_on_fit_end=True; set both or neither.")
        self.config = config
        self.adapter_name = adapter_name
        self.submodule = submodule
        self.lora_fa = lora_fa
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.check_optimizer = check_optimizer
        self.merge_on_fit_end = merge_on_fit_end
        self.merged_weights_dir = Path(merged_weights_dir) if merged_weights_dir is not None else None
        self._check_calibration(calibration_batches)
        self.calibration_batches = calibration_batches
        self.calibration_forward = calibration_forward
        self.exact_resume = exact_resume

    def _check_calibration(self, calibration_batches: Optional[int]) -> None:
        if uses_data_init(self.config) and calibration_batches is None:
            raise ValueError(
                f"init={self.config.init!r} initialises the adapter from training data: say how many train batches "
                "it reads, e.g. LoraCallback(config, calibration_batches=16)."
            )
        if calibration_batches is not None and not uses_data_init(self.config):
            raise ValueError(
                f"calibration_batches is for data-driven inits (corda_ipm, corda_kpm, eva); init="
                f"{getattr(self.config, 'init', None)!r} reads no data. Drop calibration_batches."
            )
        if calibration_batches is not None and (
            isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1
        ):
            raise ValueError(f"calibration_batches must be an integer >= 1, got {calibration_batches!r}.")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)

    # ----- injection -----
    def target(self, pl_module: pl.LightningModule) -> Optional[nn.Module]:
        """The module the adapter goes into (``submodule`` of ``pl_module``), or None while it does not exist."""
        return submodule_of(pl_module, self.submodule)

    def inject(self, pl_module: pl.LightningModule) -> bool:
        """Add the adapter to ``pl_module`` now, unless it is already there.

        Returns:
            Whether the adapter was added.

        Raises:
            ValueError: The module to adapt does not exist, the model has this adapter with another config, or the
                model is already sharded (adapters must be added before ``fully_shard``).
        """
        target = self.target(pl_module)
        if target is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no module at {self.submodule!r} to add LoRA adapters to; build it in "
                "__init__ or configure_model, or fix LoraCallback(submodule=...)."
            )
        if self.adapter_name in adapter_names(target):
            existing = get_lora_config(target, self.adapter_name)
            if existing != self.config:
                raise ValueError(
                    f"The model already has an adapter {self.adapter_name!r} made with another "
                    f"{type(existing).__name__} "
                    f"({existing}); give this callback another adapter_name or the same config."
                )
            self._train_existing(target)
            return False
        if is_sharded(target):
            raise ValueError(
                f"{type(pl_module).__name__} was sharded in configure_model before the LoRA adapters were added, so "
                "they would not be sharded with their layers. Call lightning_lora.inject_adapters(self) inside "
                "configure_model after building the model and before fully_shard, or build the model in __init__."
            )
        # An SVD init (deterministic) waits for stage start: a resumed run restores the adapter and rebuilds its
        # residual base weights instead of computing an SVD it would overwrite. Random inits run now, before DDP
        # broadcasts rank 0's module state; with quantization every init runs now, on the full-precision weights.
        defer = kind_of(self.config).reads_base_weight(self.config) and self.config.quantization is None
        apply_lora(target, self.config, self.adapter_name, initialize=not defer)
        if self.lora_fa:
            freeze_lora_A(target, self.adapter_name)
        trainer = pl_module._trainer
        if trainer is not None and is_zero3(trainer.strategy):
            register_zero3_external_parameters(target)
        remember_adapter_shapes(pl_module)
        return True

    def _train_existing(self, target: nn.Module) -> None:
        # An adapter made elsewhere (add_weighted_adapter, a frozen earlier task) trains with this callback.
        trainable = list(adapter_parameters(target, self.adapter_name, include_frozen=False))
        if not any(parameter.requires_grad for _, parameter in trainable):
            for _, parameter in trainable:
                parameter.requires_grad_(True)
            if self.lora_fa:
                freeze_lora_A(target, self.adapter_name)

    def _can_inject_now(self, pl_module: pl.LightningModule) -> bool:
        if not is_overridden("configure_model", pl_module):
            return True  # nothing else will build the model: inject now, and let errors surface now
        target = self.target(pl_module)
        if target is None:
            return False
        if self.adapter_name in adapter_names(target):
            return True
        try:
            find_targets(target, self.config)
        except ValueError:
            return False  # the layers are built in configure_model
        return True

    # ----- hooks -----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        if self.calibration_batches and self.calibration_forward is None and not pl_module.automatic_optimization:
            raise ValueError(
                "With manual optimization training_step steps the optimizers, so it cannot run the calibration "
                "batches: pass LoraCallback(..., calibration_forward=lambda module, batch: module(batch[0])) or "
                "similar."
            )
        if self._can_inject_now(pl_module):
            self.inject(pl_module)
        else:
            run_after_module_hook(pl_module, "configure_model", self, self.inject)
        if stage == "fit":
            self._unmerge_before_restore(pl_module)
        if self.merge_on_fit_end:
            # After every callback's on_train_end (ModelCheckpoint's last save must hold the unmerged model) and
            # before the strategy's teardown (the model is still wrapped/sharded, the process group alive).
            run_after_module_hook(pl_module, "on_train_end", self, self._merge_at_train_end)
        patch_strategy_checkpointing(trainer.strategy, lora_callbacks)
        keep_adapters_float32(trainer.strategy.precision_plugin)
        if self.exact_resume:
            attach_exact_resume(trainer, pl_module, stage)
        if self.adapter_only_checkpoints and isinstance(trainer.strategy, DeepSpeedStrategy):
            trainer.strategy.exclude_frozen_parameters = True  # DeepSpeed writes its own checkpoints

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The adapter stays in the module; this callback's hooks on it end with its Trainer.
        remove_module_hooks(pl_module, self)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        if self.merge_on_fit_end and is_zero3(trainer.strategy):
            raise ValueError(
                "merge_on_fit_end is not supported with DeepSpeed ZeRO-3 (the base weights are partitioned); train "
                "with merge_on_fit_end=False and merge the saved adapter afterwards with merge_and_unload."
            )
        others = [c for c in trainer.callbacks if isinstance(c, LoraCallback) and c is not self]
        if any(c.adapter_only_checkpoints != self.adapter_only_checkpoints for c in others):
            raise ValueError("All LoraCallbacks of a Trainer must agree on adapter_only_checkpoints.")
        if any(c.adapter_name == self.adapter_name for c in others):
            raise ValueError(f"Two LoraCallbacks use adapter_name={self.adapter_name!r}; give each its own name.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        present = target is not None and self.adapter_name in adapter_names(target)
        check_present_at_fit_start(present, f"The LoRA adapter {self.adapter_name!r}")
        if self.merged_weights_dir is not None and quantized_layers(target):
            raise ValueError(
                "merged_weights_dir cannot be written from a quantised base: merging in place re-quantises the "
                "weights. Train with merge_on_fit_end=False, then export a full-precision merged model with "
                "save_merged_model(model, directory, dequantize=True)."
            )
        check_writable_destination(self.merged_weights_dir, "LoraCallback(merged_weights_dir=...)", trainer)
        if self.merge_on_fit_end:
            check_plans_allow(lora_layers(target), MERGE, "LoraCallback(merge_on_fit_end=True)")
        check_sharded_quantization(target)
        if is_merged_into(target, self.adapter_name):
            # Sharded strategies only: their checkpoint restore comes after on_fit_start.
            with full_parameters_of(trainer.strategy):
                reshard_fsdp2(target)
                unmerge_after_last_fit(target, self.adapter_name)
        self._initialize_pending(trainer, pl_module)
        if self.check_optimizer:
            check_optimizer_holds_trainable_parameters(trainer, pl_module)
        rank_zero_info(f"LoRA adapter {self.adapter_name!r}: {trainable_parameters_summary(pl_module)}")

    def _unmerge_before_restore(self, pl_module: pl.LightningModule) -> None:
        # Single-device and DDP runs restore a checkpoint before on_fit_start: loading adapter values into a merged
        # adapter would make the unmerge subtract the wrong delta, so unmerge first.
        target = self.target(pl_module)
        if is_merged_into(target, self.adapter_name) and not is_sharded(target):
            unmerge_after_last_fit(target, self.adapter_name)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._initialize_pending(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._initialize_pending(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._initialize_pending(trainer, pl_module)

    def _initialize_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the strategy's setup: real (materialised) weights on every rank. Single-device and DDP runs have
        # restored their checkpoint by now, so only adapters no checkpoint restored are initialised; FSDP and
        # DeepSpeed restore after on_fit_start, over the initialised adapters. The strategy's model is passed so
        # that FSDP1 unshards every unit around the adapters.
        model = trainer.strategy.model if trainer.strategy.model is not None else pl_module
        if trainer.state.fn == "fit" and pending_data_layers(pl_module, self.adapter_name):
            return  # calibrated at train start (or restored before it)
        if initialize_pending_adapters(model, self.adapter_name, progress=rank_zero_info):
            refresh_optimizer_copies(trainer.strategy)

    def _merge_at_train_end(self, pl_module: pl.LightningModule) -> None:
        merge_at_fit_end(pl_module, self.target(pl_module), self.adapter_name, self.merged_weights_dir)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "adapter_name": self.adapter_name,
            "kind": self.config.kind,
            "config": self.config.to_dict(),
            "submodule": self.submodule,
        }


def inject_adapters(pl_module: pl.LightningModule) -> None:
    """Add the adapters of every :class:`LoraCallback` of the module's Trainer now (those of ``LoraMixin`` too).

    For ``configure_model`` hooks that build and shard the model (FSDP2): call it between the two, so the adapters
    are sharded with their layers. Idempotent.

    Args:
        pl_module: The LightningModule whose ``configure_model`` is running.

    Raises:
        ValueError: The module is not attached to a Trainer with a LoraCallback (or is not a LoraMixin).

    Example::

        def configure_model(self):
            if self.model is not None:
                return
            self.model = build_model()
            inject_adapters(self)
            for block in self.model.blocks:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])
    """
    callbacks = lora_callbacks(pl_module)
    if not callbacks:
        raise ValueError(
            f"{type(pl_module).__name__} has no LoRA adapters to add: pass LoraCallback(config) to the Trainer, or "
            "derive the module from LoraMixin."
        )
    for callback in callbacks:
        callback.inject(pl_module)


def lora_callbacks(pl_module: pl.LightningModule) -> list[LoraCallback]:
    """The LoraCallbacks of the Trainer ``pl_module`` is attached to (with a LoraMixin's own)."""
    trainer = pl_module._trainer
    found = [c for c in trainer.callbacks if isinstance(c, LoraCallback)] if trainer is not None else []
    own = getattr(pl_module, "lora_callback", None)
    return found if own is None or own in found else [*found, own]

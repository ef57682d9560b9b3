"""Data-driven inits (CorDA, EVA) inside a Trainer run: :class:`~lightning_lora.LoraCallback` with
``calibration_batches=N`` runs :func:`~lightning_lora.calibrate_adapters` on the first ``N`` batches of the train
dataloader at train start, after every checkpoint restore and before the first optimizer step.

The Lightning layer only decides when and with which batches; the core computes. Every rank uses its own first
``N`` batches (as many on every rank: the smallest count), and the core combines their statistics, so the ranks
agree. The loaders are iterated through copies, so the training loop's own iterators (persistent workers included)
are untouched; with a shuffling sampler the calibration batches are a separate draw. During the sanity check the
pending adapter is left out of forward (it would add nothing: every init leaves the outputs unchanged).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_lora.core.common.distributed import clean_name, is_sharded
from lightning_lora.core.config.init_names import is_data_init
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.inits.svd_init import apply_init_residual, has_init_factors
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import get_lora_config
from lightning_lora.core.surgery.calibration import calibrate_adapters
from lightning_lora.core.surgery.inject import apply_lora
from lightning_lora.core.surgery.removal import delete_adapter
from lightning_lora.core.training.param_groups import freeze_lora_A
from lightning_lora.lightning.checkpoint import remember_adapter_shapes
from lightning_lora.lightning.fit_support import check_optimizer_holds_trainable_parameters, refresh_optimizer_copies

CalibrationForward = Callable[[pl.LightningModule, Any], Any]
# What EVA writes into a config (its ranks); a checkpoint's config may differ from the run's in these only.
EVA_WRITTEN_FIELDS = ("rank_pattern", "alpha_pattern", "target_modules")


def uses_data_init(config: Any) -> bool:
    """Whether ``config`` asks for a data-driven init (``init="corda_ipm"``, ``"corda_kpm"``, ``"eva"``)."""
    return is_data_init(kind_of(config).init_name(config))


def pending_data_layers(target: nn.Module, adapter_name: str) -> list[Any]:
    """The layers where ``adapter_name`` still waits for its data-driven init (none once restored or calibrated)."""
    return [
        layer
        for _, layer in lora_layers(target)
        if adapter_name in layer.lora_settings
        and not layer.lora_settings[adapter_name].initialized
        and uses_data_init(layer.lora_settings[adapter_name].config)
    ]


@contextmanager
def left_out_of_forward(layers: list[Any], adapter_name: str) -> Iterator[None]:
    """Within the block, ``adapter_name`` takes no part in the forward of ``layers`` (it is pending)."""
    active = [(layer, list(layer.active_adapters)) for layer in layers]
    for layer in layers:
        layer.active_adapters = [name for name in layer.active_adapters if name != adapter_name]
    try:
        yield
    finally:
        for layer, names in active:
            layer.active_adapters = names


def train_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` batches of the train dataloader(s) on this rank, on the device, as ``training_step``
    receives them; as many on every rank. When the loader has fewer (on some rank), all of them, with a warning that
    gives the number used.

    Raises:
        ValueError: The Trainer has no train batches.
    """
    loaders = trainer.train_dataloader
    if loaders is None:
        raise ValueError("LoraCallback(calibration_batches=...) reads the train dataloader, but this run has none.")
    combined = CombinedLoader(loaders, "max_size_cycle")
    combined.flattened = [_fresh(loader) for loader in combined.flattened]
    batches = []
    iterator = iter(combined)
    for _ in range(count):
        try:
            batch, _, _ = next(iterator)
        except StopIteration:
            break
        batches.append(batch)
    found = torch.tensor(float(len(batches)), device=trainer.strategy.root_device)
    agreed = trainer.strategy.reduce(found, None, "min")
    batches = batches[: int(agreed)]
    if not batches:
        raise ValueError("The train dataloader gave no batch to calibrate on; check the data and limit_train_batches.")
    if len(batches) < count:
        rank_zero_warn(
            f"calibration_batches={count}, but the train dataloader gives only {len(batches)} batch(es)"
            f"{' on some rank' if trainer.world_size > 1 else ''}: calibrating on {len(batches)}. Set "
            f"calibration_batches={len(batches)} (or fewer) to silence this, or give the loader more data."
        )
    return [trainer.strategy.batch_to_device(batch, dataloader_idx=0) for batch in batches]


def _fresh(loader: Any) -> Any:
    """A copy of a DataLoader that starts its own iterator (and workers), leaving the original's alone."""
    if not isinstance(loader, DataLoader):
        return loader
    duplicate = copy.copy(loader)
    duplicate._iterator = None  # a persistent-workers loader would otherwise reset the training loop's iterator
    return duplicate


def training_step_forward(pl_module: pl.LightningModule) -> Callable[[nn.Module, Any], Any]:
    """``forward(model, batch)`` that runs the module's own ``training_step`` with ``self.log`` switched off."""

    def forward(model: nn.Module, batch: Any) -> Any:
        with _logging_off(pl_module):
            return pl_module.training_step(batch, 0)

    return forward


@contextmanager
def _logging_off(pl_module: pl.LightningModule) -> Iterator[None]:
    pl_module.__dict__["log"] = lambda *args, **kwargs: None
    pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.__dict__["log"], pl_module.__dict__["log_dict"]


def calibrate_in_trainer(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    target: nn.Module,
    adapter_name: str,
    count: int,
    forward: Optional[CalibrationForward],
) -> tuple[dict[str, int], int]:
    """Calibrate the pending data-driven adapter ``adapter_name`` of ``target`` on the first ``count`` train batches
    (all of them, with a warning, when the loader has fewer).

    Without a wrapper around the model (single device), EVA may give layers new adapter tensors; the optimizers then
    hold the new tensors instead of the old ones (nothing has stepped yet). Under DDP/FSDP a rank redistribution that
    changes shapes is refused by the core, with the fix.

    Returns:
        ``({layer name: rank}, number of batches used)``.
    """
    batches = train_batches(trainer, count)
    step = training_step_forward(pl_module) if forward is None else (lambda model, batch: forward(pl_module, batch))
    wrapped = trainer.strategy.model is not None and trainer.strategy.model is not pl_module
    before = dict(target.named_parameters())
    modes = {module: module.training for module in pl_module.modules()}  # each module's own mode comes back
    pl_module.eval()
    try:
        result = calibrate_adapters(target, batches, forward=step, adapter_name=adapter_name, resize=not wrapped)
    finally:
        for module, training in modes.items():
            module.training = training
    _replace_in_optimizers(trainer, before, dict(target.named_parameters()))
    return result.get(adapter_name, {}), len(batches)


def _replace_in_optimizers(
    trainer: pl.Trainer, before: dict[str, nn.Parameter], after: dict[str, nn.Parameter]
) -> None:
    """Point the optimizers at the parameters that replaced others of the same name (dropping removed ones)."""
    renamed = {id(p): after.get(name) for name, p in before.items() if after.get(name) is not p}
    if not renamed:
        return
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            held = [p for p in group["params"] if id(p) in renamed]
            if any(optimizer.state.get(p) for p in held):
                raise RuntimeError("The optimizer has already stepped on the adapter EVA resized; calibrate first.")
            group["params"] = [renamed.get(id(p), p) for p in group["params"] if renamed.get(id(p), p) is not None]


def calibrated_config(saved: Any, config: LoraConfig) -> Optional[LoraConfig]:
    """The config a checkpoint's EVA adapter was calibrated to, when it differs from ``config`` only in what EVA
    writes (its ranks); None otherwise.

    Args:
        saved: The ``config`` dict a :class:`~lightning_lora.LoraCallback` stored in the checkpoint.
        config: The run's config.
    """
    if kind_of(config).init_name(config) != "eva" or not isinstance(saved, dict):
        return None
    try:
        before = LoraConfig.from_dict(saved)
    except (TypeError, ValueError):
        return None
    now = config.to_dict()
    same = all(before.to_dict()[k] == v for k, v in now.items() if k not in EVA_WRITTEN_FIELDS)
    return before if same and before != config else None


class DataInitHooks:
    """The hooks of :class:`~lightning_lora.LoraCallback` for data-driven inits: the pending adapter sits out the
    sanity check, is calibrated at train start, and a resumed EVA run takes its ranks from the checkpoint. Uses the
    callback's ``config``, ``adapter_name``, ``calibration_batches``, ``calibration_forward``, ``lora_fa``,
    ``check_optimizer`` and ``target()``."""

    config: Any
    adapter_name: str
    calibration_batches: Optional[int]
    calibration_forward: Optional[CalibrationForward]
    lora_fa: bool
    check_optimizer: bool
    target: Callable[[pl.LightningModule], Optional[nn.Module]]

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = pending_data_layers(pl_module, self.adapter_name)
        if layers:
            self._sanity_check_context = left_out_of_forward(layers, self.adapter_name)
            self._sanity_check_context.__enter__()

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        context = self.__dict__.pop("_sanity_check_context", None)
        if context is not None:
            context.__exit__(None, None, None)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        if target is None or not pending_data_layers(target, self.adapter_name):
            return  # no data-driven init, or restored from a checkpoint
        assert self.calibration_batches is not None
        ranks, used = calibrate_in_trainer(
            trainer, pl_module, target, self.adapter_name, self.calibration_batches, self.calibration_forward
        )
        refresh_optimizer_copies(trainer.strategy)
        self.config = get_lora_config(target, self.adapter_name)  # EVA's ranks, saved with checkpoints
        remember_adapter_shapes(pl_module)
        if self.check_optimizer:
            check_optimizer_holds_trainable_parameters(trainer, pl_module)
        rank_zero_info(f"LoRA adapter {self.adapter_name!r}: {self.config.init} calibrated on "
                       f"{used} batch(es); ranks {sorted(set(ranks.values()))}.")  # fmt: skip

    def adopt_checkpoint_config(self, pl_module: pl.LightningModule, callback_states: dict[str, Any]) -> None:
        """Before a checkpoint's adapter is loaded: take over the ranks an EVA calibration wrote into the saved
        config (the adapter is rebuilt with those shapes), so a resumed EVA run needs only its original config.
        Sharded models cannot be rebuilt: the checkpoint check then names the config to resume with."""
        target = self.target(pl_module)
        saved = callback_states.get(self.state_key)  # type: ignore[attr-defined]
        adopted = calibrated_config(saved.get("config") if isinstance(saved, dict) else None, self.config)
        if target is None or adopted is None or not pending_data_layers(target, self.adapter_name):
            return
        if is_sharded(target):
            return
        delete_adapter(target, self.adapter_name)
        self.config = adopted
        apply_lora(target, adopted, self.adapter_name, initialize=False)
        if self.lora_fa:
            freeze_lora_A(target, self.adapter_name)
        remember_adapter_shapes(pl_module)

    def layers_awaiting_residual(self, pl_module: pl.LightningModule) -> list[tuple[str, LoraLayer]]:
        """Before a sharded checkpoint load: the layers whose data-driven init (CorDA) is still pending."""
        pending = set(map(id, pending_data_layers(pl_module, self.adapter_name)))
        return [
            (clean_name(name), layer)
            for name, layer in lora_layers(pl_module)
            if id(layer) in pending and has_init_factors(layer, self.adapter_name)
        ]

    def rebuild_residuals(self, layers: list[tuple[str, LoraLayer]], loaded_keys: set[str]) -> None:
        """After a sharded (torch.distributed.checkpoint) load, which writes the saved initial factors in place: turn
        the original base weights into their residual, as a single-device load does (not for weights the checkpoint
        restored itself). Collective: every rank runs it on the same layers."""
        for name, layer in layers:
            if f"{name}.weight" not in loaded_keys and f"{name}.lora_init_A.{self.adapter_name}" in loaded_keys:
                apply_init_residual(layer, self.adapter_name)

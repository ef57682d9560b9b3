"""ReLoRA as a callback: merge, re-initialise and warm-restart every N steps, so low-rank updates add up to a
high-rank one (Lialin et al. 2023, https://arxiv.org/abs/2307.05695)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_lora.core.common.checks import is_finite_number, is_integer
from lightning_lora.core.common.distributed import reshard_fsdp2
from lightning_lora.core.inits.initializers import initializer_keeps_factors
from lightning_lora.core.kinds.lora import lora_factor_delta
from lightning_lora.core.layers.layer_types import EmbeddingAdapters
from lightning_lora.core.training.base_updates import (
    add_to_base_weight,
    prune_optimizer_state,
    reinitialize_lora,
    whole_factors,
)
from lightning_lora.lightning.schedules.base import BaseMovingSchedule, warn_beyond_run

Record = dict[str, dict[str, torch.Tensor]]  # {layer name: {"lora_A": A, "lora_B": B}} folded at one restart


class ReLoraSchedule(BaseMovingSchedule):
    """Every ``restart_every`` optimizer steps: fold the adapter into the base weights, start it afresh (``A``
    Kaiming-uniform, ``B`` zero), prune its optimizer state, and warm the learning rate up again.

    The warm-up multiplies whatever learning rate the optimizer has (your scheduler's, e.g. a cosine) by
    ``k / restart_warmup_steps`` on the ``k``-th step after a restart, which gives the paper's jagged schedule; the
    factor is undone right after each step, so schedulers see their own values. The initial warm-up is your
    scheduler's. Logged: ``relora/restarts`` and ``relora/lr_factor``.

    Checkpoints stay small and resume exactly: they keep the factors folded at each restart (rank ``r`` each), and a
    resumed run folds them again, in order, into the base it was built from. The trained model is the merged one;
    no LoRA file can hold it (the folded update has rank up to ``restarts * r``): export it with
    ``LoraCallback(merge_on_fit_end=True, merged_weights_dir=...)``.

    Args:
        restart_every: Optimizer steps between restarts (the paper: a few thousand).
        restart_warmup_steps: Steps of the learning-rate ramp after each restart; must be shorter than
            ``restart_every`` (the paper's code: 50-100).
        optimizer_pruning: Fraction of the adapter's optimizer state (Adam's moments), smallest magnitudes first, set
            to zero at a restart; ``1`` resets it.
        seed: Seeds the re-initialisations (restart ``k`` draws from ``seed + k``), the same on every rank.
        adapter_name: The LoRA adapter (plain LoRA or rsLoRA, with a Kaiming or Gaussian init).

    Example::

        trainer = L.Trainer(callbacks=[LoraCallback(LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
                                       ReLoraSchedule(restart_every=1000, restart_warmup_steps=50)])
    """

    metric_prefix = "relora"
    algorithm = "ReLoRA"

    def __init__(
        self,
        restart_every: int,
        restart_warmup_steps: int = 0,
        optimizer_pruning: float = 0.9,
        seed: int = 0,
        adapter_name: str = "default",
    ) -> None:
        super().__init__(adapter_name)
        if not is_integer(restart_every) or restart_every < 1:
            raise ValueError(f"restart_every must be a positive number of steps, got {restart_every!r}.")
        if not is_integer(restart_warmup_steps) or not 0 <= restart_warmup_steps < restart_every:
            raise ValueError(
                f"restart_warmup_steps={restart_warmup_steps!r} must be in [0, restart_every={restart_every}): a "
                "ReLoRA period shorter than its warm-up would never train at the full learning rate. Restart less "
                "often or warm up for fewer steps."
            )
        if not (is_finite_number(optimizer_pruning) and 0.0 <= optimizer_pruning <= 1.0):
            raise ValueError(
                f"optimizer_pruning must be a fraction in [0, 1] (the share of optimizer state reset at a restart), "
                f"got {optimizer_pruning!r}."
            )
        if not is_integer(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.restart_every = restart_every
        self.restart_warmup_steps = restart_warmup_steps
        self.optimizer_pruning = optimizer_pruning
        self.seed = seed
        self.folded: list[Record] = []
        self._hooks: list[Any] = []

    def lr_factor(self, step: int) -> float:
        """The warm-up factor of optimizer step ``step`` (0-based): ``k / restart_warmup_steps`` on the ``k``-th
        step after a restart, else 1."""
        since_restart = step % self.restart_every
        if step < self.restart_every or since_restart >= self.restart_warmup_steps:
            return 1.0
        return since_restart / self.restart_warmup_steps

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settings = self.layers[0][1].lora_settings[self.adapter_name]
        init = settings.kind.init_name(settings.config)
        if not settings.kind.lora_factors or initializer_keeps_factors(init):
            what = settings.kind.display_name if not settings.kind.lora_factors else f"init={init!r}"
            raise ValueError(
                f"ReLoRA restarts a plain LoRA adapter from LoRA's default init; adapter {self.adapter_name!r} uses "
                f"{what}. Use LoraConfig(init='kaiming') without use_dora for ReLoRA."
            )
        embeddings = [name for name, layer in self.layers if isinstance(layer, EmbeddingAdapters)]
        if embeddings:
            raise ValueError(
                f"ReLoRA re-initialises linear and convolution adapters; {embeddings[:3]} are embeddings. Leave them "
                "out with LoraConfig(exclude_modules=[...])."
            )
        super().start(trainer, pl_module)
        first_restart = self.restart_every - 1
        warn_beyond_run(trainer, first_restart, f"ReLoraSchedule(restart_every={self.restart_every}) (first restart)")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hooks += self._warmup_hooks(trainer, optimizer)

    def _warmup_hooks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> list[Any]:
        undo: list[Any] = []

        def scale(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            factor = self.lr_factor(trainer.global_step)  # completed steps: the index of the one starting now
            if factor != 1.0:
                undo[:] = [group["lr"] for group in opt.param_groups]
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * factor

        def restore(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group, lr in zip(opt.param_groups, undo):
                group["lr"] = lr
            undo.clear()

        return [optimizer.register_step_pre_hook(scale), optimizer.register_step_post_hook(restore)]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        if (step + 1) % self.restart_every == 0:
            self._restart(trainer, pl_module, len(self.folded) + 1)
        return {"restarts": len(self.folded), "lr_factor": self.lr_factor(step)}

    @torch.no_grad()
    def _restart(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        reshard_fsdp2(pl_module)  # edits must reach the FSDP2 shards, not an unsharded copy
        generator = torch.Generator().manual_seed(self.seed + index)
        record: Record = {}
        for name, layer in self.layers:
            lora_A, lora_B = whole_factors(layer, self.adapter_name)
            add_to_base_weight(layer, lora_factor_delta(layer, lora_A, lora_B, layer.scaling(self.adapter_name)))
            record[name] = {"lora_A": lora_A.to("cpu", copy=True), "lora_B": lora_B.to("cpu", copy=True)}
            reinitialize_lora(layer, self.adapter_name, generator)
        self.folded.append(record)
        factors = [getattr(layer, c)[self.adapter_name] for _, layer in self.layers for c in ("lora_A", "lora_B")]
        for optimizer in trainer.optimizers:
            prune_optimizer_state(optimizer, factors, self.optimizer_pruning)

    @override
    def schedule_state(self) -> dict[str, Any]:
        return {"folded": self.folded}

    @override
    @torch.no_grad()
    def restore_state(self, state: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folded = list(state.get("folded", []))
        reshard_fsdp2(pl_module)
        layers = dict(self.layers)
        missing = sorted({name for record in self.folded for name in record} - set(layers))
        if missing:
            raise ValueError(
                f"The checkpoint's ReLoRA restarts folded adapters of {missing[:3]}, which the model's adapter "
                f"{self.adapter_name!r} does not have: resume with the LoraConfig the run was started with."
            )
        for record in self.folded:  # the same additions, in the same order, as the interrupted run made
            for name, factors in record.items():
                layer = layers[name]
                device = layer.lora_A[self.adapter_name].device
                lora_A, lora_B = (factors[key].to(device) for key in ("lora_A", "lora_B"))
                add_to_base_weight(layer, lora_factor_delta(layer, lora_A, lora_B, layer.scaling(self.adapter_name)))

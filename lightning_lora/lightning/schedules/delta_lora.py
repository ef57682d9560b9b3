"""Delta-LoRA as a callback: the base weight of each adapted layer follows the adapter's step-to-step change
(Zi et al. 2023, https://arxiv.org/abs/2309.02411)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_lora.core.common.checks import is_finite_number, is_integer
from lightning_lora.core.common.distributed import reshard_fsdp2
from lightning_lora.core.kinds.lora import lora_factor_delta
from lightning_lora.core.training.base_updates import add_to_base_weight, whole_factors
from lightning_lora.lightning.schedules.base import BaseMovingSchedule, warn_beyond_run


class DeltaLoraSchedule(BaseMovingSchedule):
    """After every optimizer step from ``start_step`` on: ``W += update_ratio * (s B' A' - s B A)``, where ``B A``
    is the adapter before the step and ``B' A'`` after it (``s`` its scaling).

    The base weights of the adapted layers then train at full rank for the memory of LoRA's optimizer state, at the
    cost of one dense ``B A`` product per layer and step. The paper trains such adapters without dropout (so the
    adapter's gradient is the weight's); a ``dropout > 0`` is refused. Adapter-only checkpoints keep the whole
    weights of the adapted layers (their change is not low-rank), not the rest of the model, and resume exactly. Export
    the merged model (``LoraCallback(merge_on_fit_end=True, merged_weights_dir=...)``): no adapter file holds it.
    Logged: ``delta_lora/update_norm`` (the Frobenius norm of the last step's base change, all layers).

    Args:
        update_ratio: The paper's lambda: how far the base moves per unit of adapter change (the paper uses 2).
        start_step: The first optimizer step (0-based) whose change moves the base (the paper's K: the adapter
            first warms up alone).
        adapter_name: The LoRA adapter (LoRA, rsLoRA; not DoRA).

    Example::

        trainer = L.Trainer(callbacks=[LoraCallback(LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
                                       DeltaLoraSchedule(update_ratio=2.0, start_step=500)])
    """

    metric_prefix = "delta_lora"
    algorithm = "Delta-LoRA"
    checkpoint_weights = True

    def __init__(self, update_ratio: float = 2.0, start_step: int = 0, adapter_name: str = "default") -> None:
        super().__init__(adapter_name)
        if not is_integer(start_step) or start_step < 0:
            raise ValueError(f"start_step must be a step index >= 0, got {start_step!r}.")
        if not (is_finite_number(update_ratio) and update_ratio > 0):
            raise ValueError(
                f"update_ratio must be > 0 and finite, got {update_ratio!r}: it scales every base-weight update (the "
                "paper uses 2; without Delta-LoRA, train plain LoRA)."
            )
        self.update_ratio = float(update_ratio)
        self.start_step = start_step
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settings = self.layers[0][1].lora_settings[self.adapter_name]
        kind, dropout = settings.kind, settings.kind.layer_dropout(settings.config)
        if not kind.lora_factors or dropout > 0:
            raise ValueError(
                f"Delta-LoRA moves the base by the adapter's change, which stands for the weight's own update only "
                f"for a plain LoRA without dropout; adapter {self.adapter_name!r} has "
                f"{kind.display_name if not kind.lora_factors else f'dropout={dropout}'}. Use LoraConfig(dropout=0.0) "
                "without use_dora."
            )
        super().start(trainer, pl_module)
        warn_beyond_run(trainer, self.start_step, f"DeltaLoraSchedule(start_step={self.start_step})")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._before = self._snapshot()  # after a resume: the restored adapter

    def _snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: tuple(t.clone() for t in whole_factors(layer, self.adapter_name)) for name, layer in self.layers}

    @override
    @torch.no_grad()
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        after = self._snapshot()
        if step < self.start_step:
            self._before = after
            return {}
        reshard_fsdp2(pl_module)  # edits must reach the FSDP2 shards, not an unsharded copy
        squared_norm = 0.0
        for name, layer in self.layers:
            scaling = layer.scaling(self.adapter_name)
            before, now = (lora_factor_delta(layer, *factors[name], scaling) for factors in (self._before, after))
            change = self.update_ratio * (now - before)
            add_to_base_weight(layer, change)
            squared_norm += float(change.float().pow(2).sum())
        self._before = after
        return {"update_norm": squared_norm**0.5}

"""AM-LoRA as a callback: a new task's adapter trains beside the frozen earlier ones, all mixed per layer and per
token by a learned attentional selector with an L1 sparsity term (Liu et al. 2024, https://arxiv.org/abs/2409.19611).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.composition.amlora import (
    GATES,
    add_amlora,
    amlora_adapters,
    amlora_l1,
    has_amlora,
    set_amlora_l1_weight,
)
from lightning_lora.core.kinds import AdapterKind
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.lightning.module_hooks import (
    check_present_at_fit_start,
    remove_module_hooks,
    run_after_module_hook,
)
from lightning_lora.lightning.schedules.base import AdapterSchedule


class AmLoraSchedule(AdapterSchedule):
    """Trains the adapter of a new task AM-LoRA style, without a line in ``training_step``.

    At setup (right after ``configure_model`` when the module builds its model there, so before the optimizer is
    built) :func:`~lightning_lora.add_amlora` adds the attentional selector ``amlora_selector`` (trainable) to the
    module the adapter is on, freezes the earlier tasks' adapters and what only they save, and makes every adapted
    layer compute ``W_0 x + Σ_i g_i Δw_i x`` over the earlier adapters and the new one. During the fit every backward
    also carries the gradient of ``l1_weight * L1`` (the selector weights' L1 term, see
    :func:`~lightning_lora.amlora_l1`), scaled by ``1 / accumulate_grad_batches`` as Lightning scales the loss; the
    loss you log is your own. The model keeps the selector after the fit: evaluating it uses the mixture, with no
    task id. Adapter-only checkpoints keep the selector (it trains) and resume exactly. Logged: ``amlora/l1``.

    Args:
        adapter_name: The new task's adapter (added by its ``LoraCallback``, listed before this callback).
        earlier_adapters: The earlier tasks' adapters in task order; default: every other adapter of the model.
        l1_weight: Weight ``λ`` of the L1 term (the paper gives none that we could read; 0.01 by default).
        gate: ``"softmax"`` (the paper's, with a zero-LoRA slot) or ``"relu"`` (see :func:`~lightning_lora.add_amlora`).

    Raises:
        ValueError: A negative ``l1_weight``, an unknown ``gate``, ``earlier_adapters`` holding the new adapter; at
            setup, what :func:`~lightning_lora.add_amlora` refuses (no earlier adapter, an unknown one, DoRA, ...),
            before any step.

    Example::

        # task 1 trained with LoraCallback(config, adapter_name="task1"); then, for task 2:
        trainer = L.Trainer(callbacks=[LoraCallback(config, adapter_name="task2"), AmLoraSchedule("task2")])
    """

    works_on = "adapters that add an update of their own (LoRA, LoHa, LoKr, VeRA; not DoRA, OFT or AdaLoRA)"

    def accepts(self, kind: AdapterKind) -> bool:
        return kind.action == "add" and not kind.rank_budget
    metric_prefix = "amlora"

    def __init__(
        self,
        adapter_name: str = "default",
        earlier_adapters: Optional[Sequence[str]] = None,
        l1_weight: float = 0.01,
        gate: str = "softmax",
    ) -> None:
        super().__init__(adapter_name)
        if not (is_finite_number(l1_weight) and l1_weight >= 0):
            raise ValueError(f"l1_weight must be a number >= 0 and finite, got {l1_weight!r}; 0 adds no L1 term.")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}.")
        if earlier_adapters is not None and adapter_name in earlier_adapters:
            raise ValueError(f"earlier_adapters must not include the adapter being trained ({adapter_name!r}).")
        self.earlier_adapters = None if earlier_adapters is None else list(earlier_adapters)
        self.l1_weight, self.gate = float(l1_weight), gate
        self._adapters: list[str] = []

    def apply(self, pl_module: pl.LightningModule) -> None:
        """Add AM-LoRA to the module the adapter is on now (idempotent)."""
        module = self.adapted_module(pl_module)
        if self.adapter_name not in adapter_names(module):
            self._find_layers(pl_module)  # raises, naming the fix
        add_amlora(module, self.adapter_name, self.earlier_adapters, gate=self.gate)
        self._adapters = amlora_adapters(module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not is_overridden("configure_model", pl_module) or self.adapter_name in adapter_names(
            self.adapted_module(pl_module)
        ):
            self.apply(pl_module)
            return
        # The adapter appears in configure_model (LoraCallback chained its injection there): chain after it.
        run_after_module_hook(pl_module, "configure_model", self, self.apply)

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = self.adapted_module(pl_module)
        check_present_at_fit_start(has_amlora(module), "AM-LoRA")
        set_amlora_l1_weight(module, self.l1_weight / trainer.accumulate_grad_batches)

    @override
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        module = self.adapted_module(pl_module)
        return {"l1": float(amlora_l1(module).detach())}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = self.adapted_module(pl_module)
        remove_module_hooks(pl_module, self)
        if stage == "fit" and has_amlora(module):
            set_amlora_l1_weight(module, 0.0)  # later forwards (tests, other loops) add no L1 gradient

    @override
    def schedule_state(self) -> dict[str, Any]:
        return {"adapters": list(self._adapters), "gate": self.gate}

    @override
    def check_saved_state(self, state: dict[str, Any]) -> None:
        saved, gate = state.get("adapters"), state.get("gate")
        if gate is not None and gate != self.gate:
            raise ValueError(f"The checkpoint's AM-LoRA selector used gate={gate!r}; resume with the same gate.")
        if saved and self._adapters and saved != self._adapters:
            raise ValueError(
                f"The checkpoint's AM-LoRA selector mixes {saved}, in this order, not {self._adapters}; resume with "
                "the same adapters (earlier_adapters=...)."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_saved_state(state_dict)
        super().load_state_dict(state_dict)

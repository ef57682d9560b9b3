"""O-LoRA as a callback: a new task's adapter learns in a subspace orthogonal to the earlier tasks' adapters, which
stay frozen and active (Wang et al. 2023, https://arxiv.org/abs/2310.14152)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import lightning.pytorch as pl
from typing_extensions import override

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.composition.continual import adapter_l2_norm, orthogonal_subspace_penalty
from lightning_lora.core.inits.svd_init import has_init_factors
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config, saved_module_state
from lightning_lora.core.layers.adapter_tensors import adapter_parameters
from lightning_lora.lightning.schedules.base import AdapterSchedule


class OLoraSchedule(AdapterSchedule):
    """Trains the adapter of a new task O-LoRA style, without a line in ``training_step``.

    At fit start the earlier tasks' adapters are frozen and made active beside the new one (the model computes with
    all of them, as O-LoRA does); what is saved with an earlier adapter alone (its ``modules_to_save``) is frozen too,
    what the new adapter also saves (a head every task trains) keeps training. After every backward the gradient of
    ``orthogonal_weight * sum |A_earlier A_new^T| + l2_weight * sum ||p||_2`` (the new adapter's tensors ``p``) is
    added to the new adapter's gradients, scaled by ``1 / accumulate_grad_batches``; the loss you log is your own.
    Logged: ``olora/orthogonality`` and ``olora/l2``.

    Args:
        adapter_name: The new task's LoRA adapter (added by its ``LoraCallback``).
        earlier_adapters: The earlier tasks' adapters; default: every other LoRA adapter of the model.
        orthogonal_weight: Weight of the orthogonality penalty (the authors' scripts: 0.5).
        l2_weight: Weight of the L2 term (the authors' scripts: 0).

    Example::

        # task 1 trained and saved; task 2:
        load_adapter(model, "task1", adapter_name="task1")
        trainer = L.Trainer(callbacks=[LoraCallback(config, adapter_name="task2"), OLoraSchedule("task2")])
    """

    metric_prefix = "olora"

    def __init__(
        self,
        adapter_name: str = "default",
        earlier_adapters: Optional[Sequence[str]] = None,
        orthogonal_weight: float = 0.5,
        l2_weight: float = 0.0,
    ) -> None:
        super().__init__(adapter_name)
        for name, value in (("orthogonal_weight", orthogonal_weight), ("l2_weight", l2_weight)):
            if not (is_finite_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0 and finite, got {value!r}; 0 turns the term off.")
        if earlier_adapters is not None and adapter_name in earlier_adapters:
            raise ValueError(f"earlier_adapters must not include the adapter being trained ({adapter_name!r}).")
        self.earlier_adapters = None if earlier_adapters is None else list(earlier_adapters)
        self.orthogonal_weight, self.l2_weight = float(orthogonal_weight), float(l2_weight)
        self._earlier: list[str] = []
        self._logged = {"orthogonality": math.nan, "l2": math.nan}

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = self.adapted_module(pl_module)
        present = [name for name in adapter_names(module) if name != self.adapter_name]
        earlier = present if self.earlier_adapters is None else self.earlier_adapters
        unknown = [name for name in earlier if name not in present]
        if unknown or not earlier:
            raise ValueError(
                f"OLoraSchedule needs the earlier tasks' adapters on the model beside {self.adapter_name!r}; "
                f"{f'{unknown} are not there' if unknown else 'there are none'} (the model has {present}). Load them "
                "first with load_adapter(model, directory, adapter_name=...)."
            )
        for name in earlier:
            config = get_lora_config(module, name)
            if not kind_of(config).lora_factors or any(has_init_factors(layer, name) for _, layer in self.layers):
                raise ValueError(
                    f"Earlier adapter {name!r} is not a plain LoRA adapter; O-LoRA compares the A matrices of plain "
                    "LoRA adapters. Leave it out with earlier_adapters=[...]."
                )
        self._earlier = list(earlier)
        parameters = dict(module.named_parameters())
        shared = {key for key, _ in saved_module_state(module, self.adapter_name)}  # e.g. a head both tasks train
        for name in self._earlier:  # frozen (with what is saved with them alone), and computing beside the new one
            for _, parameter in adapter_parameters(module, name):
                parameter.requires_grad_(False)
            for key, _ in saved_module_state(module, name):
                if key not in shared and key in parameters:
                    parameters[key].requires_grad_(False)
        for _, layer in self.layers:
            layer.active_adapters = [n for n in [*self._earlier, self.adapter_name] if n in layer.lora_settings]

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.training:
            return
        # A callback cannot change the loss training_step returned: back-propagate the penalty's share on its own.
        # It depends only on adapter tensors, equal on every rank, so its gradient needs no reduction.
        orthogonality = orthogonal_subspace_penalty(self.layers, self.adapter_name, self._earlier)
        penalty = self.orthogonal_weight * orthogonality
        if self.l2_weight:
            l2 = adapter_l2_norm(self.layers, self.adapter_name)
            penalty = penalty + self.l2_weight * l2
            self._logged["l2"] = float(l2.detach())
        if penalty.requires_grad:
            (penalty / trainer.accumulate_grad_batches).backward()
        self._logged["orthogonality"] = float(orthogonality.detach())

    @override
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        return {name: value for name, value in self._logged.items() if not math.isnan(value)}

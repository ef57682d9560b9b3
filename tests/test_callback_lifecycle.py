"""A callback's effect on the module ends with its Trainer: refitting the same module instance under another Trainer
(another LoraCallback, none, or after merge_and_unload) does what that Trainer says and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning_models import BuiltInConfigureModel, BuiltInInit, dataloader, lora_config, trainer_arguments

from lightning_lora import LoraCallback, adapter_names, merge_and_unload
from lightning_lora.lightning.module_hooks import remove_module_hooks, run_after_module_hook


def _fit(module: L.LightningModule, *callbacks: Any) -> None:
    L.Trainer(**trainer_arguments(max_steps=2, callbacks=list(callbacks))).fit(module, dataloader())


class FullFineTune(BuiltInConfigureModel):
    """Built in configure_model; optimises every parameter that trains (a full fine-tune once nothing is frozen)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_a_later_trainer_without_merge_leaves_the_model_unmerged_and_the_old_export_alone(tmp_path: Path) -> None:
    module = BuiltInInit()
    exported = tmp_path / "merged"
    _fit(module, LoraCallback(lora_config(), merge_on_fit_end=True, merged_weights_dir=exported))
    written = {path.name: path.read_bytes() for path in exported.iterdir()}
    _fit(module, LoraCallback(lora_config()))
    assert module.model.fc1.merged_adapters == []  # the first callback's merge did not run again
    assert {path.name: path.read_bytes() for path in exported.iterdir()} == written


def test_a_plain_fit_after_merge_and_unload_trains_without_the_old_callback() -> None:
    module = BuiltInInit()
    _fit(module, LoraCallback(lora_config(), merge_on_fit_end=True))
    module.model = merge_and_unload(module.model)
    module.model.requires_grad_(True)
    before = module.model.fc1.weight.detach().clone()
    _fit(module)  # raised "The model has no LoRA adapters to merge" at train end
    assert not torch.equal(module.model.fc1.weight, before)


def test_a_full_fine_tune_after_merge_and_unload_gets_no_fresh_adapter() -> None:
    module = FullFineTune()
    _fit(module, LoraCallback(lora_config()))
    module.model = merge_and_unload(module.model)
    module.model.requires_grad_(True)
    before = module.model.fc1.weight.detach().clone()
    _fit(module)  # configure_model re-injected a fresh adapter and froze the base
    assert adapter_names(module.model) == []
    assert module.model.fc1.weight.requires_grad and not torch.equal(module.model.fc1.weight, before)


def test_the_module_keeps_no_hook_of_a_finished_trainer() -> None:
    module = BuiltInConfigureModel()
    _fit(module, LoraCallback(lora_config(), merge_on_fit_end=True))
    assert adapter_names(module.model) == ["default"]
    assert "configure_model" not in vars(module) and "on_train_end" not in vars(module)


class _Owner:
    """A stand-in callback: the chained action runs while the Trainer holds it."""


def test_removing_one_owners_link_keeps_the_others_in_order() -> None:
    module = BuiltInConfigureModel()
    first, second, third = _Owner(), _Owner(), _Owner()
    calls: list[str] = []
    for name, owner in (("first", first), ("second", second), ("third", third)):
        run_after_module_hook(module, "configure_model", owner, lambda m, name=name: calls.append(name))
    module._trainer = type("Trainer", (), {"callbacks": [first, second, third]})()
    remove_module_hooks(module, second)
    module.configure_model()
    assert calls == ["first", "third"] and module.model is not None  # the module's own hook ran first
    remove_module_hooks(module, first)
    remove_module_hooks(module, third)
    assert "configure_model" not in vars(module)
    module._trainer = None

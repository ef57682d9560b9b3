"""O-LoRA: the penalty's gradient is added without editing the loss, the earlier task's adapter stays frozen and
active, the new adapter's subspace moves away from the earlier one's, exact resume, and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, dataloader, lora_config, trainer_arguments
from models import randomize_adapters
from numerics import assert_parity
from torch import nn

from lightning_lora import LoraCallback, OLoraSchedule, adapter_state_dict, apply_lora, lora_layers
from lightning_lora.core.composition.continual import adapter_l2_norm, orthogonal_subspace_penalty


class TaskTwo(BuiltInInit):
    """TinyNet whose first task's adapter ("task1") is already trained (random values stand in for it)."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        apply_lora(self.model, lora_config(r=2, modules_to_save=None), "task1")
        randomize_adapters(self.model, scale=0.3)


class GradProbe(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _fit(tmp_path: Path, schedule: OLoraSchedule, **overrides: Any) -> tuple[TaskTwo, L.Trainer]:
    L.seed_everything(0)
    module = TaskTwo()
    ckpt_path = overrides.pop("ckpt_path", None)
    callbacks = [LoraCallback(lora_config(r=2), adapter_name="task2"), schedule, *overrides.pop("callbacks", [])]
    overrides.setdefault("max_epochs", 2)
    trainer = L.Trainer(**trainer_arguments(default_root_dir=tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return module, trainer


def _overlap(module: nn.Module) -> float:
    return float(orthogonal_subspace_penalty(lora_layers(module), "task2", ["task1"]))


def test_the_penalty_gradient_is_added_to_the_new_adapter_only(tmp_path: Path) -> None:
    probe = GradProbe()
    _fit(tmp_path, OLoraSchedule("task2", orthogonal_weight=0.3, l2_weight=0.2), max_steps=1, callbacks=[probe])
    # By hand: the same module and batch, both adapters active, loss + 0.3 * sum|A1 A2^T| + 0.2 * sum ||p||.
    L.seed_everything(0)
    fresh = TaskTwo()
    LoraCallback(lora_config(r=2), adapter_name="task2").inject(fresh)
    layers = lora_layers(fresh)
    for _, layer in layers:
        layer.active_adapters = ["task1", "task2"]
    x, y = next(iter(dataloader()))
    loss = nn.functional.mse_loss(fresh.model(x), y)
    loss = loss + 0.3 * orthogonal_subspace_penalty(layers, "task2", ["task1"]) + 0.2 * adapter_l2_norm(layers, "task2")
    loss.backward()
    expected = {n: p.grad for n, p in fresh.named_parameters() if p.grad is not None and ".task1" not in n}
    assert set(probe.grads[0]) == set(expected)  # nothing of task1 gets a gradient
    for name, grad in expected.items():
        assert_parity(probe.grads[0][name], grad, msg=name)


def test_the_earlier_adapter_stays_frozen_and_active_and_the_subspaces_separate(tmp_path: Path) -> None:
    plain, _ = _fit(tmp_path / "plain", OLoraSchedule("task2", orthogonal_weight=0.0), max_epochs=4)
    orthogonal, trainer = _fit(tmp_path / "olora", OLoraSchedule("task2", orthogonal_weight=2.0), max_epochs=4)
    L.seed_everything(0)
    earlier = adapter_state_dict(TaskTwo(), "task1")  # as it was before task 2
    for key, value in adapter_state_dict(orthogonal, "task1").items():
        assert torch.equal(value, earlier[key]), key
    assert all(layer.active_adapters == ["task1", "task2"] for _, layer in lora_layers(orthogonal))
    assert _overlap(orthogonal) < 0.5 * _overlap(plain)
    assert trainer.callback_metrics["olora/orthogonality"] >= 0


def test_what_only_the_earlier_adapter_saves_is_frozen_and_what_both_save_trains(tmp_path: Path) -> None:
    class SavedHead(BuiltInInit):
        def __init__(self) -> None:
            super().__init__(lr=1e-2)
            apply_lora(self.model, lora_config(r=2, modules_to_save=["head"]), "task1")

    for new_saves_head in (False, True):
        L.seed_everything(0)
        module = SavedHead()
        head = module.model.head.weight.detach().clone()
        config = lora_config(r=2, modules_to_save=["head"] if new_saves_head else None)
        callbacks = [LoraCallback(config, adapter_name="task2"), OLoraSchedule("task2")]
        L.Trainer(**trainer_arguments(max_steps=2, callbacks=callbacks)).fit(module, dataloader())
        assert torch.equal(module.model.head.weight, head) != new_saves_head


def test_resume_is_exact(tmp_path: Path) -> None:
    schedule = lambda: OLoraSchedule("task2", orthogonal_weight=0.5, l2_weight=0.1)  # noqa: E731
    uninterrupted, _ = _fit(tmp_path / "a", schedule())
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", schedule(), max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True)
    resumed, trainer = _fit(tmp_path / "c", schedule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 8
    for key, value in adapter_state_dict(uninterrupted, "task2").items():
        assert torch.equal(adapter_state_dict(resumed, "task2")[key], value), key


@pytest.mark.parametrize(("build", "message"), [
    (lambda: OLoraSchedule("task2", orthogonal_weight=-1), "orthogonal_weight must be a number >= 0"),
    (lambda: OLoraSchedule("task2", earlier_adapters=["task2"]), "must not include the adapter being trained"),
])
def test_bad_settings_are_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(("earlier", "message"), [(["other"], r"\['other'\] are not there"), ([], "there are none")])
def test_missing_earlier_adapters_fail_before_any_step(tmp_path: Path, earlier: list, message: str) -> None:
    L.seed_everything(0)
    module = TaskTwo()
    callbacks = [LoraCallback(lora_config(r=2), adapter_name="task2"), OLoraSchedule("task2", earlier_adapters=earlier)]
    trainer = L.Trainer(**trainer_arguments(max_steps=2, callbacks=callbacks))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0

"""ReLoRA and Delta-LoRA, the schedules that also move the base weights: each against a plain PyTorch loop written
from the papers' update rules, exact resume with small checkpoints (what they keep of the base), the merged model as
the only export, and the bad input they refuse before any training step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, dataloader, lora_config, probe_inputs, trainer_arguments
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    AdapterExport,
    DeltaLoraSchedule,
    LoraCallback,
    ReLoraSchedule,
    lora_layers,
    save_adapter,
)

LR = 1e-2
ADAPTED = ("fc1", "fc2")


def _fit(tmp_path: Path, schedule: Callable[[], L.Callback], config: Any = None, **overrides: Any) -> tuple[BuiltInInit, L.Trainer]:
    """BuiltInInit with r=2 LoRA on fc1/fc2 (head trained as modules_to_save): 4 steps per epoch."""
    L.seed_everything(0)
    module = BuiltInInit(lr=LR)
    ckpt_path = overrides.pop("ckpt_path", None)
    callbacks = [LoraCallback(config or lora_config(r=2)), schedule(), *overrides.pop("callbacks", [])]
    overrides.setdefault("max_epochs", 3)
    trainer = L.Trainer(**trainer_arguments(default_root_dir=tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return module, trainer


StepRule = Callable[[int, BuiltInInit, torch.optim.Optimizer], None]


def _reference(steps: int, after_step: StepRule, lr_factor: Callable[[int], float] = lambda step: 1.0,
               before_training: Callable[[BuiltInInit], None] = lambda module: None) -> BuiltInInit:
    """The same module, adapter init, optimizer and batches, trained by a plain loop."""
    L.seed_everything(0)
    module = BuiltInInit(lr=LR)
    L.Trainer(**trainer_arguments(max_steps=0, callbacks=[LoraCallback(lora_config(r=2))])).fit(module, dataloader())
    before_training(module)
    optimizer = module.configure_optimizers()
    batches = list(dataloader())
    for step in range(steps):
        x, y = batches[step % len(batches)]
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_factor(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(module.model(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            after_step(step, module, optimizer)
    return module


def _layers(module: BuiltInInit) -> list[nn.Module]:
    return [getattr(module.model, name) for name in ADAPTED]


def _assert_same_model(ours: BuiltInInit, reference: BuiltInInit, exact: bool = False) -> None:
    for key, value in reference.model.state_dict().items():
        mine = ours.model.state_dict()[key]
        if exact:
            assert torch.equal(mine, value), key
        else:
            assert_parity(mine, value, msg=key)


def _resume_pair(tmp_path: Path, schedule: Callable[[], L.Callback]) -> tuple[BuiltInInit, BuiltInInit, dict, L.Trainer]:
    """An uninterrupted 3-epoch run and one stopped after epoch 1 (standing in for a kill) and resumed."""
    uninterrupted, _ = _fit(tmp_path / "a", schedule)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", schedule, max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    resumed, trainer = _fit(tmp_path / "c", schedule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 12
    return uninterrupted, resumed, checkpoint, trainer


# ----- ReLoRA -----
RESTART_EVERY, WARMUP, PRUNING = 3, 2, 0.5


def _relora() -> ReLoraSchedule:
    return ReLoraSchedule(restart_every=RESTART_EVERY, restart_warmup_steps=WARMUP, optimizer_pruning=PRUNING, seed=5)


def _relora_by_hand(step: int, module: BuiltInInit, optimizer: torch.optim.Optimizer) -> None:
    if (step + 1) % RESTART_EVERY:
        return
    generator = torch.Generator().manual_seed(5 + (step + 1) // RESTART_EVERY)
    for layer in _layers(module):
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        layer.weight += layer.scaling("default") * B @ A
        A.copy_(nn.init.kaiming_uniform_(torch.empty_like(A), a=math.sqrt(5), generator=generator))
        B.zero_()
        for factor in (A, B):
            for moment in ("exp_avg", "exp_avg_sq"):
                tensor = optimizer.state[factor][moment]
                largest_pruned = tensor.abs().flatten().sort().values[int(PRUNING * tensor.numel()) - 1]
                tensor.mul_(tensor.abs() > largest_pruned)


def _relora_lr(step: int) -> float:
    since = step % RESTART_EVERY
    return since / WARMUP if step >= RESTART_EVERY and since < WARMUP else 1.0


def test_relora_folds_restarts_prunes_and_warms_up_as_the_paper_s_loop(tmp_path: Path) -> None:
    module, trainer = _fit(tmp_path, _relora, max_epochs=2)  # 8 steps: restarts after steps 3 and 6
    _assert_same_model(module, _reference(8, _relora_by_hand, _relora_lr))
    schedule = next(c for c in trainer.callbacks if isinstance(c, ReLoraSchedule))
    assert len(schedule.folded) == 2 and trainer.callback_metrics["relora/restarts"] == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == LR  # the warm-up factor never stays in the optimizer
    assert [schedule.lr_factor(step) for step in range(8)] == [1, 1, 1, 0, 0.5, 1, 0, 0.5]


def test_relora_resumes_exactly_from_a_checkpoint_that_keeps_the_folded_factors_not_the_base(tmp_path: Path) -> None:
    uninterrupted, resumed, checkpoint, _ = _resume_pair(tmp_path, _relora)
    _assert_same_model(resumed, uninterrupted, exact=True)  # base weights (4 restarts folded) and adapters, bitwise
    assert not any(key.endswith(("fc1.weight", "fc2.weight")) for key in checkpoint["state_dict"])
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ReLoraSchedule"))
    assert len(state["folded"]) == 1 and state["folded"][0]["model.fc1"]["lora_A"].shape == (2, 8)


def test_relora_leaves_a_merged_model_and_refuses_adapter_files(tmp_path: Path) -> None:
    module, _ = _fit(tmp_path, _relora, max_epochs=1)
    with pytest.raises(ValueError, match="ReLoRA changed the base weights.*save_merged_model"):
        save_adapter(module.model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    L.seed_everything(0)
    merged = BuiltInInit(lr=LR)
    callbacks = [LoraCallback(lora_config(r=2), merge_on_fit_end=True), _relora()]
    L.Trainer(**trainer_arguments(max_epochs=1, callbacks=callbacks)).fit(merged, dataloader())
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(merged))
    x = probe_inputs()
    assert_parity(merged.model(x), module.model(x))


# ----- Delta-LoRA -----
RATIO, START = 2.0, 2


def _delta_lora() -> DeltaLoraSchedule:
    return DeltaLoraSchedule(update_ratio=RATIO, start_step=START)


class _DeltaLoraByHand:
    def __init__(self) -> None:
        self.before: dict[nn.Module, torch.Tensor] = {}

    def __call__(self, step: int, module: BuiltInInit, optimizer: torch.optim.Optimizer) -> None:
        for layer in _layers(module):
            product = layer.scaling("default") * layer.lora_B["default"] @ layer.lora_A["default"]
            if step >= START:
                layer.weight += RATIO * (product - self.before[layer])
            self.before[layer] = product

    @torch.no_grad()
    def start(self, module: BuiltInInit) -> None:
        for layer in _layers(module):
            self.before[layer] = layer.scaling("default") * layer.lora_B["default"] @ layer.lora_A["default"]


def test_delta_lora_moves_the_base_by_the_adapter_s_change_as_the_paper_s_loop(tmp_path: Path) -> None:
    module, trainer = _fit(tmp_path, _delta_lora, max_epochs=2)
    by_hand = _DeltaLoraByHand()
    _assert_same_model(module, _reference(8, by_hand, before_training=by_hand.start))
    assert trainer.callback_metrics["delta_lora/update_norm"] > 0


def test_delta_lora_resumes_exactly_from_a_checkpoint_with_the_adapted_weights_only(tmp_path: Path) -> None:
    uninterrupted, resumed, checkpoint, _ = _resume_pair(tmp_path, _delta_lora)
    _assert_same_model(resumed, uninterrupted, exact=True)
    keys = set(checkpoint["state_dict"])
    assert {"model.fc1.weight", "model.fc2.weight"} <= keys and "model.fc1.bias" not in keys


# ----- bad input -----
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ReLoraSchedule(restart_every=10, restart_warmup_steps=10), "a ReLoRA period shorter than its warm-up"),
        (lambda: ReLoraSchedule(restart_every=0), "restart_every must be a positive"),
        (lambda: ReLoraSchedule(restart_every=5, optimizer_pruning=1.5), "optimizer_pruning must be a fraction"),
        (lambda: DeltaLoraSchedule(update_ratio=0), "update_ratio must be > 0"),
        (lambda: DeltaLoraSchedule(start_step=-1), "start_step must be a step index"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "schedule, config, extra, message",
    [
        (_relora, lora_config(r=2, use_dora=True), [], "works on LoRA factors .*; adapter 'default' is a DoRA adapter"),
        (_relora, lora_config(r=2, init="pissa"), [], "uses init='pissa'"),
        (_delta_lora, lora_config(r=2, dropout=0.1), [], "has dropout=0.1. Use LoraConfig\\(dropout=0.0\\)"),
        (_delta_lora, None, [lambda tmp: AdapterExport(tmp / "out")], "Drop AdapterExport and export the merged"),
    ],
)
def test_runs_the_schedule_cannot_serve_fail_before_any_step_and_leave_the_model(
    tmp_path: Path, schedule: Callable[[], L.Callback], config: Any, extra: list, message: str
) -> None:
    L.seed_everything(0)
    module = BuiltInInit(lr=LR)
    before = module.model(probe_inputs())
    callbacks = [LoraCallback(config or lora_config(r=2)), schedule(), *(make(tmp_path) for make in extra)]
    trainer = L.Trainer(**trainer_arguments(max_steps=4, callbacks=callbacks))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0  # and the model computes what it did (adapters at their init, base unmoved)
    assert_parity(module.model(probe_inputs()), before)

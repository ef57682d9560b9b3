"""LoraMixin: optimizer and scheduler from callables with LoRA+ groups, training only the adapters,
load_from_checkpoint of adapter-only checkpoints, and construction by LightningCLI."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import MixinModule, dataloader, lora_config, trainer_arguments

from lightning_lora import LoraMixin, adapter_state_dict

LR, RATIO = 2e-3, 8.0


def _attached(module: L.LightningModule) -> L.Trainer:
    """A Trainer with the module attached and its adapter injected, as during ``fit`` after setup."""
    trainer = L.Trainer(**trainer_arguments())
    trainer.strategy.connect(module)
    module.trainer = trainer
    module.lora_callback.inject(module)
    return trainer


def test_optimizer_groups_take_lr_and_weight_decay_from_the_optimizer_callable() -> None:
    module = MixinModule(
        lora_config=lora_config(),
        optimizer=functools.partial(torch.optim.AdamW, lr=LR, weight_decay=0.05),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1),
        scheduler_interval="step",
        loraplus_lr_ratio=RATIO,
    )
    _attached(module)
    configured = module.configure_optimizers()
    groups = {g["name"]: g for g in configured["optimizer"].param_groups}
    assert {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()} == {
        "lora_A": (LR, 0.05),
        "lora_B": (LR * RATIO, 0.05),
        "decay": (LR, 0.05),  # the head in modules_to_save
        "no_decay": (LR, 0.0),  # its bias
    }
    assert module.model.fc1.lora_B["default"] in groups["lora_B"]["params"]
    assert isinstance(configured["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert configured["lr_scheduler"]["interval"] == "step"


def test_fit_trains_only_the_adapter_and_the_modules_to_save() -> None:
    module = MixinModule(lora_config=lora_config(), optimizer=functools.partial(torch.optim.AdamW, lr=LR))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    L.Trainer(**trainer_arguments(max_steps=3)).fit(module, dataloader())
    after = module.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {"model.head.weight", "model.head.bias"}  # the frozen base is bit-identical
    assert after["model.fc1.lora_B.default"].abs().sum() > 0  # zero at init, trained now


def test_load_from_checkpoint_restores_an_adapter_only_checkpoint(tmp_path: Path) -> None:
    arguments = {"lora_config": lora_config(), "optimizer": functools.partial(torch.optim.AdamW, lr=LR)}
    L.seed_everything(0)
    trained = MixinModule(**arguments)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    L.Trainer(**trainer_arguments(max_steps=3, enable_checkpointing=True, callbacks=[checkpoint])).fit(
        trained, dataloader()
    )
    L.seed_everything(0)  # the same base weights, as a model built from the same pretrained files
    loaded = MixinModule.load_from_checkpoint(tmp_path / "last.ckpt", **arguments)
    expected, restored = adapter_state_dict(trained), adapter_state_dict(loaded)
    assert expected.keys() == restored.keys()
    assert all(torch.equal(expected[k], restored[k]) for k in expected)


def test_optimizer_without_a_learning_rate_is_refused() -> None:
    module = MixinModule(lora_config=lora_config(), optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    _attached(module)
    with pytest.raises(ValueError, match="no positive default learning rate"):
        module.configure_optimizers()


def test_mixin_listed_after_lightning_module_is_refused() -> None:
    with pytest.raises(TypeError, match=r"put the mixin first"):

        class Wrong(L.LightningModule, LoraMixin):
            pass


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"scheduler_interval": "batch"}, "scheduler_interval"), ({"loraplus_lr_embedding": 1e-6}, "loraplus_lr_ratio")],
)
def test_invalid_arguments_raise(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MixinModule(lora_config=lora_config(), **arguments)


def test_lightning_cli_builds_the_mixin_from_a_config() -> None:
    from lightning.pytorch.cli import LightningCLI

    config = {
        "model": {
            "lora_config": {"r": 2, "alpha": 4, "target_modules": ["fc1"]},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
            "loraplus_lr_ratio": 4.0,
        },
        "trainer": trainer_arguments(max_steps=1),
    }
    cli = LightningCLI(
        MixinModule, run=False, args=config, auto_configure_optimizers=False, save_config_callback=None
    )
    cli.trainer.fit(cli.model, dataloader())
    groups = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert groups == {"lora_A": 0.05, "lora_B": 0.2}
    assert cli.model.lora_config.r == 2

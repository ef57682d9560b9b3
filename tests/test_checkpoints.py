"""Adapter-only checkpoints on one CPU process: what the files hold, exact resume, and refusing checkpoints that
do not fit the model."""

from __future__ import annotations

import pickle

import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, dataloader, lora_config, trainer_arguments
from torch import nn

from lightning_lora import LoraCallback, LoraConfig, adapter_state_dict, lora_param_groups


def _fit(
    module: L.LightningModule,
    callback: LoraCallback,
    epochs: int = 1,
    checkpoint_dir: Optional[Path] = None,
    ckpt_path: Optional[Path] = None,
    weights_only: bool = False,
) -> L.Trainer:
    callbacks: list = [callback]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_weights_only=weights_only))
    trainer = L.Trainer(
        **trainer_arguments(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None)
    )
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return trainer


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state.items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class WideModule(L.LightningModule):
    """Four 256x256 layers with rank-2 adapters: the base is about 100 times the adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=1e-3))


def _wide_run(tmp_path: Path, **callback: Any) -> tuple[WideModule, dict[str, Any], int]:
    module = WideModule()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 256)), batch_size=4)
    trainer = L.Trainer(
        **trainer_arguments(
            max_steps=2, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")]
        ),
    )
    trainer.callbacks.append(LoraCallback(LoraConfig(r=2, target_modules=["0", "1", "2", "3"]), **callback))
    trainer.fit(module, data)
    path = tmp_path / "last.ckpt"
    return module, torch.load(path, weights_only=False), os.path.getsize(path)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def test_checkpoint_holds_only_the_adapter_and_its_optimizer_state(tmp_path: Path) -> None:
    module, checkpoint, file_size = _wide_run(tmp_path)
    adapter = adapter_state_dict(module)
    assert checkpoint["state_dict"].keys() == adapter.keys()
    adapter_bytes = _tensor_bytes(adapter)
    optimizer_bytes = _tensor_bytes(checkpoint["optimizer_states"])
    assert optimizer_bytes >= 2 * adapter_bytes  # AdamW: two moments per adapter tensor
    base_bytes = _tensor_bytes(module.state_dict())
    # Besides tensors: loop and callback states, and exact resume's random states and data position.
    resume_bytes = len(pickle.dumps(checkpoint["callbacks"]["ExactResume"]))
    assert adapter_bytes + optimizer_bytes < file_size < adapter_bytes + optimizer_bytes + resume_bytes + 32 * 1024
    assert file_size * 10 < base_bytes


def test_full_checkpoints_keep_every_tensor_when_asked(tmp_path: Path) -> None:
    module, checkpoint, file_size = _wide_run(tmp_path, adapter_only_checkpoints=False)
    assert checkpoint["state_dict"].keys() == module.state_dict().keys()
    assert file_size > _tensor_bytes(module.state_dict())


def test_weights_only_checkpoint_holds_only_the_adapter_and_restores_it_for_evaluation(tmp_path: Path) -> None:
    trained = BuiltInInit()
    _fit(trained, LoraCallback(lora_config()), checkpoint_dir=tmp_path, weights_only=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"].keys() == adapter_state_dict(trained).keys()
    assert "optimizer_states" not in checkpoint
    L.seed_everything(1)  # another adapter init, the same base
    fresh = BuiltInInit()
    fresh.model.load_state_dict({k: v for k, v in trained.model.state_dict().items() if "lora_" not in k}, False)
    trainer = L.Trainer(**trainer_arguments(callbacks=[LoraCallback(lora_config())]))
    trainer.validate(fresh, dataloader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert _equal(adapter_state_dict(fresh), adapter_state_dict(trained))


def test_resume_from_adapter_only_checkpoint_is_exact(tmp_path: Path) -> None:
    L.seed_everything(0)
    uninterrupted = BuiltInInit()
    _fit(uninterrupted, LoraCallback(lora_config()), epochs=2)
    L.seed_everything(0)
    _fit(BuiltInInit(), LoraCallback(lora_config()), epochs=1, checkpoint_dir=tmp_path)
    L.seed_everything(0)
    resumed = BuiltInInit()
    _fit(resumed, LoraCallback(lora_config()), epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert _equal(adapter_state_dict(resumed), adapter_state_dict(uninterrupted))
    frozen = [k for k in uninterrupted.state_dict() if not k.startswith("model.head") and "lora_" not in k]
    assert all(torch.equal(resumed.state_dict()[k], uninterrupted.state_dict()[k]) for k in frozen)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run's checkpoint (r=4 on fc1 and fc2, head saved)."""
    directory = tmp_path_factory.mktemp("trained")
    _fit(BuiltInInit(), LoraCallback(lora_config()), checkpoint_dir=directory)
    return directory / "last.ckpt"


def _validate_with(config: LoraConfig, ckpt_path: Path) -> dict[str, torch.Tensor]:
    """Validate a fresh model with adapter ``config`` from ``ckpt_path``; return its adapter as before the call."""
    module = BuiltInInit()
    callback = LoraCallback(config)
    callback.inject(module)
    before = _clone(adapter_state_dict(module))
    trainer = L.Trainer(**trainer_arguments(callbacks=[callback]))
    try:
        trainer.validate(module, dataloader(), ckpt_path=ckpt_path, verbose=False)
    finally:
        assert _equal(adapter_state_dict(module), before)  # nothing was loaded
    return before


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lora_config(r=2), r"another LoraConfig \(r: checkpoint 4 vs now 2\)"),
        (lora_config(target_modules=["fc1", "fc2", "head"], modules_to_save=None),
         r"modules_to_save: checkpoint \['head'\] vs now None, target_modules: checkpoint \['fc1', 'fc2'\] vs now"),
        (lora_config(target_modules=["fc1"]), r"target_modules: checkpoint \['fc1', 'fc2'\] vs now \['fc1'\]"),
        (lora_config(use_dora=True), "use_dora: checkpoint False vs now True"),
        (lora_config(alpha=16), r"another LoraConfig \(alpha: checkpoint 8.0 vs now 16.0\)"),
    ],
    ids=["other-rank", "other-targets", "fewer-targets", "dora", "other-alpha"],
)
def test_checkpoint_that_does_not_fit_is_refused_before_anything_loads(
    trained_checkpoint: Path, config: LoraConfig, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _validate_with(config, trained_checkpoint)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lora_config(r=2), r"shape mismatch.*fc1.lora_A.default: file \(4, 8\) vs model \(2, 8\)"),
        (lora_config(target_modules=["fc1", "fc2", "head"], modules_to_save=None), "missing key.*head.lora_A"),
        (lora_config(target_modules=["fc1"]), r"unexpected key.*fc2.lora_A"),
        (lora_config(use_dora=True), "missing key.*lora_magnitude"),
    ],
    ids=["other-rank", "other-targets", "fewer-targets", "dora"],
)
def test_a_checkpoint_without_its_config_is_checked_by_keys_and_shapes(
    trained_checkpoint: Path, tmp_path: Path, config: LoraConfig, message: str
) -> None:
    checkpoint = torch.load(trained_checkpoint, weights_only=False)
    for state in checkpoint["callbacks"].values():
        state.pop("config", None)  # as a weights-only or older checkpoint holds it
    torch.save(checkpoint, tmp_path / "no-config.ckpt")
    with pytest.raises(ValueError, match=message):
        _validate_with(config, tmp_path / "no-config.ckpt")


def test_checkpoint_missing_an_adapter_tensor_is_refused(trained_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(trained_checkpoint, weights_only=False)
    del checkpoint["state_dict"]["model.fc2.lora_B.default"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"1 missing key\(s\).*fc2.lora_B.default"):
        _validate_with(lora_config(), tmp_path / "broken.ckpt")

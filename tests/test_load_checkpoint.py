"""``load_lora_checkpoint``: the trained LightningModule back from a ``LoraCallback`` checkpoint for inference (what
``load_from_checkpoint`` cannot do, since it runs no callbacks), merged or not; LoraMixin checkpoints too."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, MixinModule, dataloader, lora_config, probe_inputs, trainer_arguments
from numerics import assert_parity

from lightning_lora import LoHaConfig, LoraCallback, load_lora_checkpoint, lora_layers


def _train(tmp_path: Path, module: L.LightningModule, callback: Optional[L.Callback], **overrides: Any) -> Path:
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True), *([callback] if callback else [])]
    trainer = L.Trainer(**trainer_arguments(max_epochs=1, callbacks=callbacks, enable_checkpointing=True, **overrides))
    trainer.fit(module, dataloader())
    return tmp_path / "last.ckpt"


@pytest.mark.parametrize(("config", "submodule"), [(lora_config(), None), (lora_config(use_dora=True), "model"),
                                                   (LoHaConfig(r=2, target_modules=["fc1", "fc2"]), "model")])
def test_the_trained_module_comes_back_with_its_adapters_merged_or_not(tmp_path: Path, config, submodule) -> None:
    L.seed_everything(0)  # the frozen base is not in adapter-only checkpoints: here it comes from the seed
    trained = BuiltInInit()
    path = _train(tmp_path, trained, LoraCallback(config, submodule=submodule))
    expected = trained.model(probe_inputs())
    with pytest.raises(RuntimeError, match="Missing key"):  # the habit this replaces
        BuiltInInit.load_from_checkpoint(path)
    L.seed_everything(0)
    loaded = load_lora_checkpoint(BuiltInInit, path)
    assert_parity(loaded.model(probe_inputs()), expected)
    L.seed_everything(0)
    merged = load_lora_checkpoint(BuiltInInit, path, merge=True)
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(merged))
    assert_parity(merged.model(probe_inputs()), expected)


def test_a_lora_mixin_checkpoint_loads_too(tmp_path: Path) -> None:
    L.seed_everything(0)
    trained = MixinModule(lora_config=lora_config())
    path = _train(tmp_path, trained, None)
    L.seed_everything(0)
    loaded = load_lora_checkpoint(MixinModule, path, lora_config=lora_config())  # MixinModule saves no hparams
    assert_parity(loaded.model(probe_inputs()), trained.model(probe_inputs()))


def test_a_checkpoint_without_adapters_is_refused_naming_load_from_checkpoint(tmp_path: Path) -> None:
    path = _train(tmp_path, BuiltInInit(), None)
    with pytest.raises(ValueError, match=r"holds no LoraCallback state.* BuiltInInit.load_from_checkpoint\(path\)"):
        load_lora_checkpoint(BuiltInInit, path)

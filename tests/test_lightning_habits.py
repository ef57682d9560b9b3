"""Everyday Lightning habits keep the callback's promises: true half precisions train float32 adapters and resume
exactly, a compiled inner network writes and reads checkpoints and adapter files under the uncompiled names, and
``load_lora_checkpoint`` loads without Lightning's key warnings."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, dataloader, lora_config, probe_inputs, trainer_arguments

from lightning_lora import LoraCallback, adapter_state_dict, load_adapter, load_lora_checkpoint, save_adapter


def _fit(module: L.LightningModule, epochs: int, tmp_path: Path, config: Any = None, ckpt_path: Any = None,
         **trainer: Any) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    lora = LoraCallback(config or lora_config())
    arguments = trainer_arguments(max_epochs=epochs, callbacks=[lora, checkpoints],
                                  enable_checkpointing=True, **trainer)
    fitted = L.Trainer(**arguments)
    fitted.fit(module, dataloader(), ckpt_path=ckpt_path)
    return fitted


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_trains_float32_adapters_on_a_cast_base_and_resumes_exactly(
    precision: str, tmp_path: Path
) -> None:
    config = lora_config(modules_to_save=None)  # a trained head is a plain layer: it would train in the half dtype
    L.seed_everything(0)
    module = BuiltInInit()
    trainer = _fit(module, 2, tmp_path / "run", config, precision=precision)
    half = torch.bfloat16 if precision == "bf16-true" else torch.float16
    assert module.model.fc1.weight.dtype == module.model.head.weight.dtype == half  # the base is cast
    adapters = adapter_state_dict(module)
    assert adapters and all(value.dtype == torch.float32 for value in adapters.values())
    states = trainer.optimizers[0].state.values()
    assert len(states) == len(adapters) and all(s["exp_avg"].dtype == torch.float32 for s in states)
    with torch.no_grad():
        assert torch.isfinite(module.model(probe_inputs().to(half))).all()
    L.seed_everything(0)
    resumed = BuiltInInit()
    _fit(resumed, 2, tmp_path / "resumed", config, ckpt_path=tmp_path / "run" / "epoch=0.ckpt", precision=precision)
    assert all(torch.equal(adapter_state_dict(resumed)[key], value) for key, value in adapters.items())


class CompiledNet(BuiltInInit):
    """The common way: the inner network compiled in ``__init__`` (eager backend: the names are what matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.compile(self.model, backend="eager")


def _inputs_and_outputs(module: L.LightningModule) -> torch.Tensor:
    with torch.no_grad():
        return module.model(probe_inputs())


def test_a_compiled_network_checkpoints_under_the_uncompiled_names(tmp_path: Path) -> None:
    L.seed_everything(0)
    compiled = CompiledNet()
    _fit(compiled, 1, tmp_path)
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["state_dict"]
    assert saved and not any("_orig_mod" in key for key in saved)
    assert "model.fc1.lora_A.default" in saved
    expected = _inputs_and_outputs(compiled)
    L.seed_everything(0)
    plain = load_lora_checkpoint(BuiltInInit, tmp_path / "epoch=0.ckpt")  # uncompiled
    torch.testing.assert_close(_inputs_and_outputs(plain), expected, rtol=0, atol=0)
    L.seed_everything(0)
    again = load_lora_checkpoint(CompiledNet, tmp_path / "epoch=0.ckpt")  # compiled
    torch.testing.assert_close(_inputs_and_outputs(again), expected, rtol=0, atol=0)


def test_a_compiled_network_resumes_from_an_uncompiled_runs_checkpoint_and_back(tmp_path: Path) -> None:
    L.seed_everything(0)
    _fit(BuiltInInit(), 1, tmp_path / "plain")
    L.seed_everything(0)
    compiled = CompiledNet()
    _fit(compiled, 2, tmp_path / "compiled", ckpt_path=tmp_path / "plain" / "epoch=0.ckpt")
    L.seed_everything(0)
    plain = BuiltInInit()
    _fit(plain, 2, tmp_path / "plain-again", ckpt_path=tmp_path / "plain" / "epoch=0.ckpt")
    assert all(torch.equal(adapter_state_dict(compiled)[key.replace("model.", "model._orig_mod.", 1)], value)
               for key, value in adapter_state_dict(plain).items())
    L.seed_everything(0)
    back = BuiltInInit()
    _fit(back, 2, tmp_path / "back", ckpt_path=tmp_path / "compiled" / "epoch=1.ckpt")  # loads, trains no more
    assert all(torch.equal(adapter_state_dict(back)[key], value) for key, value in adapter_state_dict(plain).items())


def test_adapter_files_from_a_compiled_network_load_into_an_uncompiled_one(tmp_path: Path) -> None:
    L.seed_everything(0)
    compiled = CompiledNet()
    _fit(compiled, 1, tmp_path / "run")
    save_adapter(compiled.model, tmp_path / "adapter")
    L.seed_everything(0)
    plain = BuiltInInit()
    load_adapter(plain.model, tmp_path / "adapter")
    torch.testing.assert_close(_inputs_and_outputs(plain), _inputs_and_outputs(compiled), rtol=0, atol=0)


def test_load_lora_checkpoint_warns_about_no_keys(tmp_path: Path) -> None:
    L.seed_everything(0)
    _fit(BuiltInInit(), 1, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_lora_checkpoint(BuiltInInit, tmp_path / "epoch=0.ckpt")
    assert not [w for w in caught if "Found keys" in str(w.message)]

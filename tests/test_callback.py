"""LoraCallback on one CPU process: when adapters are injected, idempotence, the optimizer check, the summary,
LoRA-FA and meta-device adapters."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
from lightning_models import (
    BuiltInConfigureModel,
    BuiltInInit,
    TinyNet,
    build_on_meta_device,
    dataloader,
    lora_config,
    trainer_arguments,
)
from numerics import assert_parity

from lightning_lora import LoraCallback, adapter_names, adapter_state_dict, inject_adapters, lora_layers


def _fit(module: L.LightningModule, callback: LoraCallback, **trainer: Any) -> L.Trainer:
    trainer_obj = L.Trainer(**trainer_arguments(**{"max_steps": 2, "callbacks": [callback], **trainer}))
    trainer_obj.fit(module, dataloader())
    return trainer_obj


def _has_adapter(module: torch.nn.Module) -> bool:
    return bool(module is not None and adapter_names(module))


class RecordsInitStyle(BuiltInInit):
    """Built in __init__, with a configure_model (where FSDP2 would shard) that records what it sees."""

    def configure_model(self) -> None:
        self.seen_in_configure_model = _has_adapter(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.base_frozen_in_configure_optimizers = not self.model.fc1.weight.requires_grad
        return super().configure_optimizers()


class RecordsConfigureModelStyle(BuiltInConfigureModel):
    """Built in configure_model: records what its own code and configure_optimizers see."""

    def configure_model(self) -> None:
        super().configure_model()
        self.seen_in_configure_model = _has_adapter(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.seen_in_configure_optimizers = _has_adapter(self.model)
        self.base_frozen_in_configure_optimizers = not self.model.fc1.weight.requires_grad
        return super().configure_optimizers()


def test_model_built_in_init_gets_adapters_before_configure_model() -> None:
    module = RecordsInitStyle()
    _fit(module, LoraCallback(lora_config()))
    assert module.seen_in_configure_model  # a fully_shard there would shard the adapters with their layers
    assert module.base_frozen_in_configure_optimizers


def test_model_built_in_configure_model_gets_adapters_right_after_it_before_optimizers() -> None:
    module = RecordsConfigureModelStyle()
    _fit(module, LoraCallback(lora_config()))
    assert not module.seen_in_configure_model
    assert module.seen_in_configure_optimizers
    assert module.base_frozen_in_configure_optimizers


class RecordsAdapterAtTrainStart(BuiltInConfigureModel):
    def on_train_start(self) -> None:
        self.adapter_at_train_start = {k: v.clone() for k, v in adapter_state_dict(self).items()}


def test_injection_is_idempotent_across_stages_and_repeated_fits() -> None:
    module = RecordsAdapterAtTrainStart()
    callback = LoraCallback(lora_config())
    trainer = _fit(module, callback)
    after_first_fit = {k: v.clone() for k, v in adapter_state_dict(module).items()}
    trainer.validate(module, dataloader(), verbose=False)
    trainer.test(module, dataloader(), verbose=False)
    trainer.predict(module, dataloader())
    assert all(torch.equal(v, adapter_state_dict(module)[k]) for k, v in after_first_fit.items())
    _fit(module, callback, max_steps=3)  # a new Trainer: continues from the trained adapter
    assert len(lora_layers(module)) == 2
    assert all(list(layer.lora_A) == ["default"] for _, layer in lora_layers(module))
    assert all(torch.equal(v, module.adapter_at_train_start[k]) for k, v in after_first_fit.items())


def test_existing_adapter_with_another_config_is_refused() -> None:
    module = BuiltInInit()
    LoraCallback(lora_config(r=2)).inject(module)
    with pytest.raises(ValueError, match="another LoraConfig"):
        _fit(module, LoraCallback(lora_config(r=4)))


class OptimizerOverAllParameters(BuiltInInit):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class OptimizerBuiltBeforeInjection(BuiltInInit):
    """What LightningCLI's automatic optimizer does: parameters collected in __init__, before the adapters exist."""

    def __init__(self) -> None:
        super().__init__()
        self.early_optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.early_optimizer


def test_optimizer_holding_frozen_base_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"holds 4 frozen tensor\(s\).*lora_param_groups"):
        _fit(OptimizerOverAllParameters(), LoraCallback(lora_config()))


def test_optimizer_built_before_injection_is_refused_with_the_lightning_cli_fix() -> None:
    with pytest.raises(ValueError, match=r"misses 4 trainable tensor\(s\).*auto_configure_optimizers=False"):
        _fit(OptimizerBuiltBeforeInjection(), LoraCallback(lora_config()))


def test_optimizer_check_can_be_switched_off() -> None:
    module = OptimizerOverAllParameters()
    trainer = _fit(module, LoraCallback(lora_config(), check_optimizer=False))
    assert trainer.state.finished and trainer.global_step == 2  # trained, where the check would have refused
    assert any(k.endswith("lora_B.default") and v.abs().sum() > 0 for k, v in adapter_state_dict(module).items())


def test_trainable_parameter_summary_is_printed_once_per_fit(caplog: pytest.LogCaptureFixture) -> None:
    module = BuiltInInit()
    with caplog.at_level(logging.INFO):
        _fit(module, LoraCallback(lora_config()))
    lines = [r.getMessage() for r in caplog.records if "trainable params" in r.getMessage()]
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert len(lines) == 1
    assert f"trainable params: {trainable:,}" in lines[0]


def test_lora_fa_trains_B_and_keeps_A_at_its_init() -> None:
    module = BuiltInInit()
    callback = LoraCallback(lora_config(), lora_fa=True)
    callback.inject(module)
    initial = {k: v.clone() for k, v in adapter_state_dict(module).items()}
    _fit(module, callback)
    after = adapter_state_dict(module)
    assert torch.equal(after["model.fc1.lora_A.default"], initial["model.fc1.lora_A.default"])
    assert not torch.equal(after["model.fc1.lora_B.default"], initial["model.fc1.lora_B.default"])


class BuiltOnMetaDevice(BuiltInConfigureModel):
    """Built on the meta device; real base weights are loaded afterwards without re-running any initialisation."""

    def __init__(self, base_state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base_state = base_state

    def configure_model(self) -> None:
        if self.model is not None:
            return
        build_on_meta_device(self)
        self.model.to_empty(device="cpu")
        self.model.load_state_dict(self.base_state, strict=False)

    def on_train_start(self) -> None:
        layer = self.model.fc1
        self.initialized_at_train_start = layer.lora_settings["default"].initialized
        self.lora_B_at_train_start = layer.lora_B["default"].detach().clone()


def test_adapters_created_on_meta_device_are_initialised_at_fit_start() -> None:
    base = TinyNet()
    module = BuiltOnMetaDevice({k: v.clone() for k, v in base.state_dict().items()})
    _fit(module, LoraCallback(lora_config()))
    assert module.initialized_at_train_start
    assert torch.equal(module.lora_B_at_train_start, torch.zeros_like(module.lora_B_at_train_start))
    assert torch.equal(module.model.fc1.weight, base.fc1.weight)


def test_adapters_are_refused_on_a_model_sharded_before_injection() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        module = BuiltInInit()
        fully_shard(module.model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match=r"sharded.*inject_adapters\(self\).*before fully_shard"):
            LoraCallback(lora_config()).inject(module)
        assert not adapter_names(module)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"config": {"r": 4}}, TypeError, "must be a LoraConfig"),
        ({"adapter_name": "a.b"}, ValueError, "Python identifier"),
        ({"merged_weights_dir": "out"}, ValueError, "merge_on_fit_end=True"),
    ],
)
def test_invalid_arguments_raise(arguments: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        LoraCallback(**{"config": lora_config(), **arguments})


def test_inject_adapters_without_a_lora_callback_explains_the_fix() -> None:
    with pytest.raises(ValueError, match="pass LoraCallback"):
        inject_adapters(BuiltInInit())


class RecordsWeightAtTrainStart(BuiltInInit):
    def on_train_start(self) -> None:
        self.weight_at_train_start = self.model.fc1.weight.detach().clone()
        self.merged_at_train_start = list(self.model.fc1.merged_adapters)


def test_a_fit_after_merge_on_fit_end_trains_the_unmerged_adapter() -> None:
    module = RecordsWeightAtTrainStart()
    base_weight = module.model.fc1.weight.detach().clone()
    callback = LoraCallback(lora_config(), merge_on_fit_end=True)
    _fit(module, callback)
    assert module.model.fc1.merged_adapters == ["default"]
    assert not torch.allclose(module.model.fc1.weight, base_weight)
    _fit(module, callback)
    assert module.merged_at_train_start == []
    assert_parity(module.weight_at_train_start, base_weight)  # unmerge rounding
    assert module.model.fc1.merged_adapters == ["default"]


def test_merge_on_fit_end_comes_after_the_last_checkpoint_is_saved(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = BuiltInInit()
    base_weight = module.model.fc1.weight.detach().clone()
    callback = LoraCallback(lora_config(), merge_on_fit_end=True, adapter_only_checkpoints=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100)
    _fit(module, callback, callbacks=[callback, checkpoint], max_steps=3, enable_checkpointing=True)
    assert module.model.fc1.merged_adapters == ["default"]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["model.fc1.weight"], base_weight, atol=0, rtol=0)


def test_resuming_into_a_merged_model_restores_the_unmerged_base(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = RecordsWeightAtTrainStart()
    base_weight = module.model.fc1.weight.detach().clone()
    callback = LoraCallback(lora_config(), merge_on_fit_end=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    _fit(module, callback, callbacks=[callback, checkpoint], max_steps=2, enable_checkpointing=True)
    assert module.model.fc1.merged_adapters == ["default"]
    trainer = L.Trainer(**trainer_arguments(max_steps=3, callbacks=[callback]))
    trainer.fit(module, dataloader(), ckpt_path=tmp_path / "epoch=0-step=1.ckpt")
    assert_parity(module.weight_at_train_start, base_weight)  # unmerge rounding


def test_two_callbacks_train_two_adapters_and_the_summary_counts_both(caplog: pytest.LogCaptureFixture) -> None:
    module = BuiltInInit()
    first = LoraCallback(lora_config(target_modules=["fc1"], modules_to_save=None), adapter_name="first")
    second = LoraCallback(lora_config(target_modules=["fc2"], modules_to_save=None), adapter_name="second")
    with caplog.at_level(logging.INFO):
        _fit(module, first, callbacks=[first, second])
    for name in ("first", "second"):
        state = adapter_state_dict(module.model, name)
        assert all(module.model.get_parameter(k).requires_grad for k in state)
        assert any(k.endswith(f"lora_B.{name}") and v.abs().sum() > 0 for k, v in state.items())  # B left zero
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    lines = [r.getMessage() for r in caplog.records if "trainable params" in r.getMessage()]
    assert lines and all(f"trainable params: {trainable:,}" in line for line in lines)


@pytest.mark.parametrize("documented", ["LoraCallback", "LoraMixin", "lora_param_groups"])
def test_docstring_example_runs(documented: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import textwrap

    import lightning_lora

    example = getattr(lightning_lora, documented).__doc__.split("Example::", 1)[1]
    monkeypatch.chdir(tmp_path)  # the Trainer writes logs and checkpoints to the working directory
    namespace: dict[str, Any] = {"__name__": "example"}
    exec(compile(textwrap.dedent(example), f"<{documented} example>", "exec"), namespace)
    if documented == "lora_param_groups":  # what the example's comment promises
        rates = {group["name"]: group["lr"] for group in namespace["optimizer"].param_groups}
        assert rates["lora_A"] == pytest.approx(2e-4) and rates["lora_B"] == pytest.approx(3.2e-3)
        return
    # The example trained its adapter: the checkpoint Lightning wrote holds it, with B moved away from zero.
    (checkpoint,) = (tmp_path / "lightning_logs").glob("version_0/checkpoints/*.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert state["model.0.lora_B.default"].abs().sum() > 0
    assert "model.0.weight" not in state  # adapter-only

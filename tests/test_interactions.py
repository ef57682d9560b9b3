"""What users do next with a method: merge, export, merge on fit end. Each cell works (checked by numbers) or is
refused by name before anything changes. Cells found broken by trying them as a user would: X-LoRA and AM-LoRA
merged silently or broke later forwards, DyLoRA exported and merged the rank of its last training step, O-LoRA's
merged export left out the earlier tasks its model computes with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning_models import BuiltInInit, dataloader, lora_config, probe_inputs, trainer_arguments
from numerics import assert_parity
from safetensors.torch import load_file
from test_amlora import TaskTwo, two_tasks

from lightning_lora import (
    AdapterExport,
    DyLoraSchedule,
    LoraCallback,
    LoraConfig,
    OLoraSchedule,
    XLoraConfig,
    active_rank,
    add_amlora,
    add_xlora,
    apply_lora,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_merged_model,
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(state[key], value) for key, value in before.items())


def _amlora_model() -> torch.nn.Module:
    return add_amlora(two_tasks(), "task2")


def _xlora_model() -> torch.nn.Module:
    return add_xlora(two_tasks(), ["task1", "task2"], XLoraConfig(hidden_size=16), hidden_states="fc2")


@pytest.mark.parametrize("build,plan", [(_amlora_model, "AM-LoRA's selector"), (_xlora_model, "X-LoRA's gate")])
@pytest.mark.parametrize("operation", ["merge_lora", "merge_and_unload", "save_merged_model"])
def test_gated_models_refuse_to_merge_and_keep_computing(build: Any, plan: str, operation: str, tmp_path: Path) -> None:
    model = build()
    before, outputs = _state(model), model(probe_inputs()).detach()
    call = {"merge_lora": lambda: merge_lora(model), "merge_and_unload": lambda: merge_and_unload(model),
            "save_merged_model": lambda: save_merged_model(model, tmp_path / "merged")}[operation]
    with pytest.raises(ValueError, match=f"computes through {plan}, which decides per call"):
        call()
    assert _unchanged(model, before) and not (tmp_path / "merged").exists()
    torch.testing.assert_close(model(probe_inputs()), outputs, rtol=0, atol=0)  # the model still works as before


def test_a_second_gate_is_refused_naming_both() -> None:
    model = _amlora_model()
    before = _state(model)
    with pytest.raises(ValueError, match=r"fc1 already computes through AM-LoRA's selector; X-LoRA's gate cannot "
                                         r"take over its call too. Take it off first: call remove_amlora\(model\)"):
        add_xlora(model, ["task1", "task2"], XLoraConfig(hidden_size=16), hidden_states="fc2")
    assert _unchanged(model, before) and not hasattr(model, "xlora_classifier")


def test_merge_on_fit_end_over_a_gated_model_is_refused_at_fit_start(tmp_path: Path) -> None:
    module = TaskTwo()
    callback = LoraCallback(lora_config(r=2), adapter_name="task2", merge_on_fit_end=True,
                            merged_weights_dir=tmp_path / "merged")
    callback.inject(module)
    add_amlora(module.model, "task2")
    trainer = L.Trainer(**trainer_arguments(max_steps=2, callbacks=[callback]))
    with pytest.raises(ValueError, match=r"LoraCallback\(merge_on_fit_end=True\) cannot act on .*AM-LoRA's selector"):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0 and not (tmp_path / "merged").exists()


def _dylora_fit(tmp_path: Path, **lora_options: Any) -> tuple[L.LightningModule, list]:
    L.seed_everything(0)
    module = BuiltInInit()
    export = AdapterExport(tmp_path / "adapter", submodule="model")
    callbacks = [LoraCallback(lora_config(modules_to_save=None), submodule="model", **lora_options), export,
                 DyLoraSchedule(eval_rank=2, seed=1)]
    L.Trainer(**trainer_arguments(max_steps=5, callbacks=callbacks)).fit(module, dataloader())
    return module, callbacks


def test_dylora_exports_and_merges_its_eval_rank_at_fit_end(tmp_path: Path) -> None:
    module, _ = _dylora_fit(tmp_path / "plain")
    assert active_rank(module.model) == 2
    expected = module.model(probe_inputs()).detach()
    torch.manual_seed(0)
    exported = load_adapter(BuiltInInit().model, tmp_path / "plain" / "adapter")
    assert exported.fc1.lora_A["default"].shape[0] == 2  # a plain rank-2 LoRA: the eval rank, not the last step's
    L.seed_everything(0)
    base = BuiltInInit().model
    exported = load_adapter(base, tmp_path / "plain" / "adapter")
    assert_parity(exported(probe_inputs()).detach(), expected)
    merged, _ = _dylora_fit(tmp_path / "merged", merge_on_fit_end=True, merged_weights_dir=tmp_path / "merged" / "w")
    assert merged.model.fc1.merged_adapters == ["default"]  # fit ended without raising
    L.seed_everything(0)
    written = BuiltInInit().model  # the submodule's keys
    written.load_state_dict(load_file(tmp_path / "merged" / "w" / "model.safetensors"))
    assert_parity(written(probe_inputs()).detach(), expected)


def test_olora_merged_export_holds_every_task_the_model_computes_with(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = TaskTwo()
    callbacks = [LoraCallback(lora_config(r=2), adapter_name="task2", merge_on_fit_end=True,
                              merged_weights_dir=tmp_path / "merged"), OLoraSchedule("task2")]
    L.Trainer(**trainer_arguments(max_steps=3, callbacks=callbacks)).fit(module, dataloader())
    computed = module.model(probe_inputs()).detach()  # task1 still active, task2 merged
    L.seed_everything(0)
    written = BuiltInInit()
    written.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    assert_parity(written.model(probe_inputs()).detach(), computed)


@pytest.mark.parametrize("feature", ["xlora", "amlora"])
def test_helpers_that_add_a_child_refuse_an_nn_sequential_root_by_name(feature: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    for name in ("a", "b"):
        apply_lora(model, LoraConfig(r=2, target_modules=["0", "2"]), adapter_name=name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    children = list(model._modules)
    with pytest.raises(ValueError, match=r"adds model\.\w+ as a child module, and an nn.Sequential runs every child"):
        if feature == "xlora":
            add_xlora(model, ["a", "b"], XLoraConfig(hidden_size=8))
        else:
            add_amlora(model, "b", ["a"])
    assert list(model._modules) == children
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())

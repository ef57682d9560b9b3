"""AM-LoRA: the selector-weighted forward and the L1 term against their definitions, what gets gradients, the
callback (loss goes down, the earlier adapter stays, exact resume from adapter-only checkpoints) and what it refuses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, TinyNet, dataloader, lora_config, probe_inputs, trainer_arguments
from models import randomize_adapters
from numerics import assert_parity
from torch import nn
from torch.nn import functional as F

from lightning_lora import (
    AmLoraSchedule,
    LoraCallback,
    XLoraConfig,
    adapter_state_dict,
    add_amlora,
    amlora_adapters,
    amlora_l1,
    amlora_weights,
    apply_lora,
    has_amlora,
    lora_layers,
    merge_lora,
    remove_amlora,
    set_active_adapters,
)
from lightning_lora.core.composition import amlora as amlora_core
from lightning_lora.core.composition.xlora import ExpertGate

GATES = ("softmax", "relu")


def two_tasks(seed: int = 0, lora_bias: bool = False) -> nn.Module:
    """TinyNet with a trained-looking "task1" adapter and a new "task2" one on fc1 and fc2 (base frozen)."""
    torch.manual_seed(seed)
    model = TinyNet()
    apply_lora(model, lora_config(r=2, modules_to_save=None, lora_bias=lora_bias), "task1")
    apply_lora(model, lora_config(r=3, alpha=3, modules_to_save=None), "task2")
    randomize_adapters(model, scale=0.3)
    return model


def randomize_selector(model: nn.Module, seed: int = 5, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.amlora_selector.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def by_hand(layer: nn.Module, selector: nn.Module, x: torch.Tensor, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_0 x + Σ g_i f_i`` and ``g`` of one linear layer, from the base weight, the factors and the selector."""
    names = [n for n in ("task1", "task2", "task3") if n in layer.lora_settings]
    features = [layer.scaling(n) * x @ layer.lora_A[n].T @ layer.lora_B[n].T for n in names]
    features = [f + layer.scaling(n) * layer.lora_bias[n] if n in getattr(layer, "lora_bias", {}) else f
                for f, n in zip(features, names)]  # fmt: skip
    scores = torch.stack([f @ selector.weight[n] + selector.bias[n] for f, n in zip(features, names)], dim=-1)
    if gate == "softmax":
        zero = selector.zero_score.expand(*scores.shape[:-1], 1)
        weights = torch.softmax(torch.cat([zero, scores], dim=-1), dim=-1)[..., 1:]
    else:
        weights = torch.relu(scores)
    out = F.linear(x, layer.weight, layer.bias) + sum(weights[..., k : k + 1] * f for k, f in enumerate(features))
    return out, weights


def tiny_net_by_hand(model: nn.Module, x: torch.Tensor, gate: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layers = model.amlora_selector.layers
    h1, g1 = by_hand(model.fc1, layers["fc1-selector"], x, gate)
    h2, g2 = by_hand(model.fc2, layers["fc2-selector"], torch.relu(h1), gate)
    return model.head(torch.relu(h2)), [g1, g2]


@pytest.mark.parametrize("lora_bias", [False, True], ids=["low_rank_path", "features_path"])
@pytest.mark.parametrize("gate", GATES)
def test_forward_equals_base_plus_weighted_adapter_outputs_by_hand(gate: str, lora_bias: bool) -> None:
    model = add_amlora(two_tasks(lora_bias=lora_bias), "task2", gate=gate)
    randomize_selector(model)
    x = probe_inputs()
    expected, weights = tiny_net_by_hand(model, x, gate)
    assert_parity(model(x), expected)
    for name, g in zip(("fc1", "fc2"), weights):
        assert_parity(amlora_weights(model)[name], g)
        assert g.shape == (x.shape[0], 2)  # one weight per position and adapter
    assert not torch.allclose(weights[0][:, 0], weights[0][:1, 0].expand(x.shape[0]))  # per position, not global


@pytest.mark.parametrize("gate", GATES)
def test_the_l1_term_equals_its_definition(gate: str) -> None:
    model = add_amlora(two_tasks(), "task2", gate=gate)
    model(probe_inputs())
    at_start = 2 / 3 if gate == "softmax" else 2.0  # uniform over zero, task1, task2 / every weight 1
    assert_parity(amlora_l1(model), torch.tensor(at_start))
    randomize_selector(model)
    x = probe_inputs()
    model(x)
    _, weights = tiny_net_by_hand(model, x, gate)
    expected = sum(g.abs().sum(-1).mean() for g in weights) / 2  # mean over layers of mean over positions
    assert_parity(amlora_l1(model), expected)
    assert amlora_l1(model).requires_grad


@pytest.mark.parametrize("gate", GATES)
def test_the_l1_gradient_added_in_backward_equals_adding_the_term_to_the_loss(gate: str) -> None:
    model = add_amlora(two_tasks(), "task2", gate=gate)
    randomize_selector(model)
    explicit = copy.deepcopy(model)
    x, target = probe_inputs(), torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    add_amlora(model, "task2", gate=gate, l1_weight=0.7)
    F.mse_loss(model(x), target).backward()
    (F.mse_loss(explicit(x), target) + 0.7 * amlora_l1(explicit)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in explicit.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    for name, grad in expected.items():
        assert_parity(grads[name], grad, msg=name)
    without = copy.deepcopy(explicit)
    for parameter in without.parameters():
        parameter.grad = None
    F.mse_loss(without(x), target).backward()
    assert not torch.allclose(without.amlora_selector.layers["fc1-selector"].bias["task1"].grad, grads[
        "amlora_selector.layers.fc1-selector.bias.task1"])  # fmt: skip  # the L1 part is not negligible


@pytest.mark.parametrize("gate", GATES)
def test_the_low_rank_path_equals_the_features_path(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = probe_inputs()
    results = []
    for low_rank in (True, False):
        if not low_rank:
            monkeypatch.setattr(amlora_core, "_low_rank", lambda layer, name: False)
        model = add_amlora(two_tasks(), "task2", gate=gate, l1_weight=0.3)
        randomize_selector(model, scale=0.3)
        output = model(x)
        output.pow(2).sum().backward()
        results.append((output, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert_parity(results[0][0], results[1][0])
    assert set(results[0][1]) == set(results[1][1])
    for name, grad in results[1][1].items():
        assert_parity(results[0][1][name], grad, msg=name)


def test_gradients_reach_the_selector_and_the_new_adapter_only() -> None:
    model = add_amlora(two_tasks(), "task2", l1_weight=0.1)
    randomize_selector(model)
    model(probe_inputs()).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        trains = name.startswith("amlora_selector.") or ".task2" in name
        assert parameter.requires_grad == trains, name
        if trains:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name  # the base and task1 get nothing


def test_relu_gate_starts_as_the_plain_sum_of_the_adapters_and_remove_restores_it() -> None:
    model = two_tasks()
    set_active_adapters(model, ["task1", "task2"])
    x = probe_inputs()
    plain = model(x)
    add_amlora(model, "task2", gate="relu")
    assert_parity(model(x), plain)
    randomize_selector(model)
    assert not torch.allclose(model(x), plain)
    remove_amlora(model)
    assert not has_amlora(model) and not hasattr(model, "amlora_selector")
    assert_parity(model(x), plain)


def test_a_third_task_extends_the_selector_and_freezes_the_second() -> None:
    model = add_amlora(two_tasks(), "task2")
    randomize_selector(model)
    learned = {k: v.clone() for k, v in model.amlora_selector.state_dict().items()}
    apply_lora(model, lora_config(r=2, target_modules=["fc2"], modules_to_save=None), "task3")
    add_amlora(model, "task3")
    assert amlora_adapters(model) == ["task1", "task2", "task3"]
    state = model.amlora_selector.state_dict()
    for key, value in learned.items():
        assert torch.equal(state[key], value), key  # what task 2 learned is kept
    assert "layers.fc2-selector.weight.task3" in state and "layers.fc1-selector.weight.task3" not in state
    earlier = [p for n, p in model.named_parameters() if ".lora_" in n and not n.endswith(".task3")]
    assert earlier and not any(p.requires_grad for p in earlier)
    assert all(p.requires_grad for p in model.amlora_selector.parameters())
    x = probe_inputs()
    expected, weights = tiny_net_by_hand(model, x, "softmax")
    assert_parity(model(x), expected)
    assert weights[1].shape == (5, 3)


# ----- the callback -----
class TaskTwo(BuiltInInit):
    """TinyNet whose first task's adapter ("task1") is already trained (random values stand in for it)."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        apply_lora(self.model, lora_config(r=2, modules_to_save=None), "task1")
        randomize_adapters(self.model, scale=0.3)


class TaskTwoInConfigureModel(L.LightningModule):
    """The same, built in ``configure_model`` (LoraCallback and AmLoraSchedule chain after it)."""

    training_step = TaskTwo.training_step

    def __init__(self) -> None:
        super().__init__()
        self.model: Any = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyNet()
            apply_lora(self.model, lora_config(r=2, modules_to_save=None), "task1")
            randomize_adapters(self.model, scale=0.3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class LossProbe(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path: Path, schedule: AmLoraSchedule, module: Any = None, **overrides: Any) -> tuple[Any, L.Trainer]:
    L.seed_everything(0)
    module = TaskTwo() if module is None else module
    ckpt_path = overrides.pop("ckpt_path", None)
    callbacks = [LoraCallback(lora_config(r=2), adapter_name="task2"), schedule, *overrides.pop("callbacks", [])]
    overrides.setdefault("max_epochs", 2)
    trainer = L.Trainer(**trainer_arguments(default_root_dir=tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("build", [TaskTwo, TaskTwoInConfigureModel], ids=["built_in_init", "configure_model"])
def test_a_short_fit_lowers_the_loss_and_keeps_the_earlier_adapter(tmp_path: Path, build: Any) -> None:
    L.seed_everything(0)
    earlier = adapter_state_dict(TaskTwo().model, "task1")  # task1 as it was before task 2 (same seed)
    probe = LossProbe()
    module, trainer = _fit(tmp_path, AmLoraSchedule("task2", l1_weight=0.01), build(), max_epochs=6,
                           callbacks=[probe])  # fmt: skip
    assert sum(probe.losses[-4:]) < 0.8 * sum(probe.losses[:4])
    for key, value in adapter_state_dict(module.model, "task1").items():
        assert torch.equal(value, earlier[key]), key
    selector = module.amlora_selector.layers["model-fc1-selector"]
    assert selector.weight["task1"].abs().sum() > 0  # the selector trained (it starts at 0)
    assert trainer.callback_metrics["amlora/l1"] > 0
    assert has_amlora(module) and amlora_adapters(module) == ["task1", "task2"]


@pytest.mark.parametrize("new_saves_head", [False, True])
def test_what_only_the_earlier_adapter_saves_is_frozen_and_what_both_save_trains(new_saves_head: bool) -> None:
    class SavedHead(BuiltInInit):
        def __init__(self) -> None:
            super().__init__(lr=1e-2)
            apply_lora(self.model, lora_config(r=2, modules_to_save=["head"]), "task1")

    L.seed_everything(0)
    module = SavedHead()
    head = module.model.head.weight.detach().clone()
    config = lora_config(r=2, modules_to_save=["head"] if new_saves_head else None)
    callbacks = [LoraCallback(config, adapter_name="task2"), AmLoraSchedule("task2")]
    L.Trainer(**trainer_arguments(max_steps=2, callbacks=callbacks)).fit(module, dataloader())
    assert torch.equal(module.model.head.weight, head) != new_saves_head


@pytest.mark.parametrize("gate", GATES)
def test_resume_from_adapter_only_checkpoint_is_exact(tmp_path: Path, gate: str) -> None:
    schedule = lambda: AmLoraSchedule("task2", l1_weight=0.05, gate=gate)  # noqa: E731
    uninterrupted, _ = _fit(tmp_path / "a", schedule())
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", schedule(), max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert "amlora_selector.layers.model-fc1-selector.weight.task1" in saved  # kept: it trains
    assert not any(key.endswith("fc1.weight") and "lora" not in key for key in saved if "selector" not in key)
    resumed, trainer = _fit(tmp_path / "c", schedule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 8
    for key, value in adapter_state_dict(uninterrupted.model, "task2").items():
        assert torch.equal(adapter_state_dict(resumed.model, "task2")[key], value), key
    for key, value in uninterrupted.amlora_selector.state_dict().items():
        assert torch.equal(resumed.amlora_selector.state_dict()[key], value), key
    x = probe_inputs()
    assert torch.equal(resumed.model(x), uninterrupted.model(x))


def test_resuming_with_another_gate_is_refused(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", AmLoraSchedule("task2", gate="relu"), max_epochs=1, callbacks=[checkpoints],
         enable_checkpointing=True)  # fmt: skip
    with pytest.raises(ValueError, match="selector used gate='relu'; resume with the same gate"):
        _fit(tmp_path / "c", AmLoraSchedule("task2"), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


# ----- what is refused -----
def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "gates": [layer.__dict__.get("forward_plan") for _, layer in lora_layers(model)],
        "children": [name for name, _ in model.named_children()],
    }


@pytest.mark.parametrize(("arguments", "message"), [
    ({"earlier_adapters": []}, "has no earlier adapter"),
    ({"earlier_adapters": ["nope"]}, r"unknown adapter\(s\) \['nope'\]"),
    ({"adapter_name": "task9"}, r"unknown adapter\(s\) \['task9'\]"),
    ({"earlier_adapters": ["task1", "task2"]}, "name an adapter twice"),
    ({"l1_weight": -0.5}, "l1_weight must be a number >= 0"),
    ({"gate": "sparsemax"}, "gate must be one of"),
])  # fmt: skip
def test_bad_arguments_are_refused_and_change_nothing(arguments: dict[str, Any], message: str) -> None:
    model = two_tasks()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        add_amlora(model, **{"adapter_name": "task2", **arguments})
    assert _snapshot(model) == before and not has_amlora(model)


@pytest.mark.parametrize("problem", ["dora", "merged", "other_gate", "dropped_adapter", "xlora"])
def test_unsuitable_models_are_refused_and_change_nothing(problem: str) -> None:
    model = two_tasks()
    new, gate, earlier, message = "task3", "softmax", None, ""
    if problem == "dora":
        apply_lora(model, lora_config(r=2, use_dora=True, modules_to_save=None), "task3")
        new, earlier, message = "task2", ["task1", "task3"], "does not add to the base output"
    elif problem == "merged":
        merge_lora(model, ["task1"])
        new, message = "task2", "merged into fc1; call unmerge_lora"
    elif problem == "xlora":
        model.fc2.forward_plan = ExpertGate(["task1"], {model.fc2: 0}, XLoraConfig())
        new, message = "task2", "fc2 already computes through X-LoRA's gate.*remove_xlora"
    else:
        add_amlora(model, "task2")
        apply_lora(model, lora_config(r=2, modules_to_save=None), "task3")
        if problem == "other_gate":
            gate, message = "relu", "with gate='softmax', not 'relu'"
        else:
            earlier, message = ["task2"], r"already mixes \['task1'\]"
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        add_amlora(model, new, earlier, gate=gate)
    assert _snapshot(model) == before


@pytest.mark.parametrize(("build", "message"), [
    (lambda: AmLoraSchedule("task2", l1_weight=-1), "l1_weight must be a number >= 0"),
    (lambda: AmLoraSchedule("task2", gate="top2"), "gate must be one of"),
    (lambda: AmLoraSchedule("task2", earlier_adapters=["task2"]), "must not include the adapter being trained"),
])  # fmt: skip
def test_bad_settings_are_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(("earlier", "message"), [(["other"], r"\['other'\]"), ([], "has no earlier adapter")])
def test_missing_earlier_adapters_fail_before_any_step(tmp_path: Path, earlier: list, message: str) -> None:
    L.seed_everything(0)
    module = TaskTwo()
    schedule = AmLoraSchedule("task2", earlier_adapters=earlier)
    trainer = L.Trainer(**trainer_arguments(max_steps=2, callbacks=[LoraCallback(lora_config(r=2), "task2"), schedule]))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0 and not has_amlora(module)


def test_the_selector_carries_to_a_later_session_through_its_state_dict() -> None:
    model = add_amlora(two_tasks(), "task2")
    randomize_selector(model)
    saved = model.amlora_selector.state_dict()
    later = two_tasks()  # the same adapters, loaded again in a new session
    apply_lora(later, lora_config(r=2, modules_to_save=None), "task3")
    add_amlora(later, "task3")
    missing, unexpected = later.amlora_selector.load_state_dict(saved, strict=False)
    assert not unexpected and missing and all(key.endswith(".task3") for key in missing)
    for key, value in saved.items():
        assert torch.equal(later.amlora_selector.state_dict()[key], value), key

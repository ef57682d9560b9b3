"""The extension points are enough on their own: a new forward plan is one class behind ``ForwardPlan``, a new
target type one planner behind ``TargetPlanner``; generic operations (merging, rollback, state dicts) treat them
like the built-in ones without knowing them."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from numerics import assert_parity
from torch import nn

import lightning_lora.core.surgery.inject as inject
from lightning_lora import LoraConfig, adapter_state_dict, apply_lora, lora_layers, merge_lora
from lightning_lora.core.layers.forward_plan import MERGE, check_free_for, install_plan, plan_of
from lightning_lora.core.surgery.sites import TARGET_PLANNERS, PlannedSite, TargetContext
from lightning_lora.core.surgery.sites.base import adapted, settings_for


class DoubledUpdate:
    """A toy plan: every active adapter's update counts twice."""

    plan_name = "the doubled update"
    removal = "del layer.forward_plan"

    def __init__(self, capabilities: frozenset[str] = frozenset()) -> None:
        self.capabilities = capabilities

    def forward(self, layer: nn.Module, x: torch.Tensor, base_forward: Callable[..., torch.Tensor], args: tuple,
                kwargs: dict) -> torch.Tensor:  # fmt: skip
        result = base_forward(x, *args, **kwargs)
        for name in layer.active_adapters:
            once = layer.lora_settings[name].kind.forward(layer, name, x, torch.zeros_like(result))
            result = result + 2 * once
        return result


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    apply_lora(model, LoraConfig(r=2, target_modules=["0", "2"]))
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B["default"])
    return model


def test_a_toy_plan_takes_over_the_call_and_generic_merging_asks_it() -> None:
    model, x = _model(), torch.randn(3, 6)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora_layers(reference):
            layer.lora_B["default"].mul_(2)  # the update, doubled exactly
    for _, layer in lora_layers(model):
        install_plan(layer, DoubledUpdate())
    assert_parity(model(x), reference(x))
    with pytest.raises(ValueError, match=r"already computes through the doubled update.*del layer.forward_plan"):
        check_free_for(lora_layers(model), "another plan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"Merging cannot act on 0: it computes through the doubled update"):
        merge_lora(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_toy_plan_that_declares_merge_lets_merging_through() -> None:
    model = _model()
    for _, layer in lora_layers(model):
        install_plan(layer, DoubledUpdate(frozenset({MERGE})))
    merge_lora(model)
    assert all(layer.merged_adapters == ["default"] and plan_of(layer) is not None for _, layer in lora_layers(model))


class MarkedModules:
    """A toy target type: every ``nn.Linear`` carrying ``adapt_me = True``, whatever ``target_modules`` says."""

    def __init__(self, fail_on_attach: bool = False) -> None:
        self.fail_on_attach = fail_on_attach

    def plan(self, context: TargetContext) -> list[PlannedSite]:
        sites = []
        for name, module in context.model.named_modules():
            if getattr(module, "adapt_me", False) and id(module) not in context.claimed:
                context.claimed.add(id(module))
                sites.append(PlannedSite(name, lambda m=module: adapted(m), self._settings(name, context)))
        return sites

    def _settings(self, name: str, context: TargetContext) -> Callable:
        def settings(layer: nn.Module):
            if self.fail_on_attach:
                raise RuntimeError("toy planner fails after the first change")
            return settings_for(name, layer, context.config)

        return settings


def test_a_toy_target_type_is_adapted_saved_and_rolled_back_by_the_generic_code(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    model[2].adapt_me = True
    monkeypatch.setattr(inject, "TARGET_PLANNERS", (*TARGET_PLANNERS, MarkedModules()))
    apply_lora(model, LoraConfig(r=2, target_modules=["0"]))
    assert [name for name, _ in lora_layers(model)] == ["0", "2"]
    assert {"2.lora_A.default", "2.lora_B.default"} <= set(adapter_state_dict(model))

    fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    fresh[2].adapt_me = True
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    monkeypatch.setattr(inject, "TARGET_PLANNERS", (*TARGET_PLANNERS, MarkedModules(fail_on_attach=True)))
    with pytest.raises(RuntimeError, match="toy planner fails"):
        apply_lora(fresh, LoraConfig(r=2, target_modules=["0"]))
    assert lora_layers(fresh) == [] and type(fresh[0]) is nn.Linear and type(fresh[2]) is nn.Linear
    assert fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert all(p.requires_grad for p in fresh.parameters())

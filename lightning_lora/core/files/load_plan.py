"""What loading an adapter file writes, checked against the model before anything is written (:class:`LoadPlan`),
and writing it (:func:`apply_load_plan`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.files.peft_format import (
    PEFT_PREFIX,
    adapter_state_from_peft,
)
from lightning_lora.core.files.state import (
    check_adapter_state_dict,
    copy_into,
    load_adapter_state_dict,
    load_shared_state,
    take_shared_state,
)
from lightning_lora.core.inits.svd_init import (
    INIT_FACTOR_DICTS,
    add_init_factor_tensors,
    has_init_factors,
    svd_init_factors,
)
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_tensors import adapter_parameters, shared_adapter_tensors


@dataclasses.dataclass
class LoadPlan:
    """What a load writes, all checked against the model before anything is written."""

    state: dict[str, torch.Tensor]  # keyed like adapter_state_dict
    base: dict[str, torch.Tensor]  # base-model tensors PEFT stored beside the adapter, keyed like state_dict
    init_factors: dict[str, dict[str, torch.Tensor]]  # layer name -> {"lora_init_A": A0, "lora_init_B": B0}
    shared: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # container -> tensor (VeRA's)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        adapter_name: str,
        tensors: Mapping[str, torch.Tensor],
        native: bool,
        injected: bool,
        config: AdapterConfig,
    ) -> LoadPlan:
        """Read a file's ``tensors`` (native or PEFT names) into a plan and check all of it against the model."""
        if not native:
            tensors = kind_of(config).peft_load_tensors(config, dict(tensors))
        tensors, shared = take_shared_state(model, adapter_name, tensors, peft=not native)
        expected_shared = sorted(shared_adapter_tensors(model, adapter_name))
        if kind_of(config).saves_shared(config) and sorted(shared) != expected_shared:
            missing = [name for name in expected_shared if name not in shared]
            raise ValueError(
                f"The file's config says it holds the {kind_of(config).display_name} tensors {expected_shared} that "
                f"every layer shares (VeRA: save_projection=True), but {missing} are missing: the file contradicts "
                "itself (PEFT refuses it too). Save the adapter again, or set save_projection=False in its config "
                "if they are rebuilt from projection_prng_key."
            )
        if native:
            plan = cls(*native_load_state(model, adapter_name, tensors))
        else:
            plan = cls(*adapter_state_from_peft(model, adapter_name, tensors), init_factors={})
            if plan.state and all(key.startswith(PEFT_PREFIX) for key in plan.state):
                raise ValueError(
                    f"None of the PEFT tensor names fit this model (e.g. {next(iter(plan.state))!r}). PEFT names are "
                    "relative to the model PEFT wrapped: pass that module (for a LightningModule holding the Hugging "
                    "Face model as self.model, load_adapter(module.model, ...))."
                )
        plan.check_init_factors(model, adapter_name, injected)
        for name, layer in lora_layers(model):
            if name in plan.init_factors and not has_init_factors(layer, adapter_name):
                add_init_factor_tensors(layer, adapter_name)  # (injected only) factors of an init the config lacks
        check_adapter_state_dict(model, plan.load_state(model, adapter_name), adapter_name)
        not_float = [k for k, v in plan.state.items() if not v.is_floating_point()]
        if not_float:
            raise ValueError(f"Tensors {not_float[:3]} are not floating point; the file is not a LoRA adapter.")
        layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_settings]
        kind_of(config).check_file_state(adapter_name, config, layers, plan.state)
        plan.shared = shared
        return plan

    def load_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The state for ``load_adapter_state_dict``: the file's tensors and initial factors under the model's keys.
        Layers whose factors the file lacks (a PEFT file asking for an SVD init) get the model's own tensors, which
        carry nothing new: their init runs on the base weights instead."""
        state = dict(self.state)
        for name, layer in lora_layers(model):
            if adapter_name not in layer.lora_settings:
                continue
            factors = self.init_factors.get(name, {})
            for dict_name in INIT_FACTOR_DICTS:
                key = f"{name}.{dict_name}.{adapter_name}" if name else f"{dict_name}.{adapter_name}"
                if dict_name in factors:
                    state[key] = factors[dict_name]
                elif has_init_factors(layer, adapter_name):
                    state[key] = getattr(layer, dict_name)[adapter_name]
        return state

    def check_init_factors(self, model: nn.Module, adapter_name: str, injected: bool) -> None:
        layers = {name: layer for name, layer in lora_layers(model) if adapter_name in layer.lora_settings}
        problems = [f"{name}: no such adapted layer" for name in self.init_factors if name not in layers]
        for name, layer in layers.items():
            factors = self.init_factors.get(name)
            in_model = svd_init_factors(layer, adapter_name) is not None
            if not injected and in_model != (factors is not None):
                where = "only in the model" if in_model else "only in the file"
                problems.append(f"{name}: initial SVD factors {where}")
            if factors is None:
                continue
            expected = dict(zip(INIT_FACTOR_DICTS, layer.adapter_shapes(layer.lora_settings[adapter_name].r)))
            for dict_name, shape in expected.items():
                value = factors.get(dict_name)
                if value is None or tuple(value.shape) != shape:
                    found = None if value is None else tuple(value.shape)
                    problems.append(f"{name}.{dict_name}: file {found} vs model {shape}")
        if problems:
            raise ValueError(
                f"The initial SVD factors do not fit adapter {adapter_name!r}: {'; '.join(problems[:3])}. The adapter "
                "was saved from a model built with another config."
            )


def native_load_state(
    model: nn.Module, adapter_name: str, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A native file's tensors split into the adapter state (under the model's keys), base tensors (none) and the
    initial SVD factors per layer."""
    model_key = {key.removesuffix(f".{adapter_name}"): key for key, _ in adapter_parameters(model, adapter_name)}
    state: dict[str, torch.Tensor] = {}
    init_factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer_name, _, leaf = key.rpartition(".")
        if leaf in INIT_FACTOR_DICTS:
            init_factors.setdefault(layer_name, {})[leaf] = value
        else:
            state[model_key.get(key, key)] = value
    return state, {}, init_factors


@torch.no_grad()
def apply_load_plan(model: nn.Module, config: AdapterConfig, adapter_name: str, plan: LoadPlan, injected: bool) -> None:
    """Write a checked plan: the method's own init where the file brings no initial factors (a just-added adapter),
    then the adapter state, shared tensors and base tensors."""
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_settings]
    for name, layer in layers:
        if injected and kind_of(config).reads_base_weight(config) and name not in plan.init_factors:
            layer.initialize_adapter(adapter_name)  # the method's own init on these base weights, as PEFT does
    # Rebuilds residual base weights from the file's initial factors (see LoraLayer.prepare_load).
    load_adapter_state_dict(model, plan.load_state(model, adapter_name), adapter_name)
    load_shared_state(model, adapter_name, plan.shared)
    if plan.base:
        model_state = model.state_dict()
        for key, value in plan.base.items():
            copy_into(model_state[key], value)

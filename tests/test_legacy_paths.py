"""Module paths from before the core's sub-packages keep working: imports by the old path, and pickles (a
``torch.save``-d adapted model, a pickled config) that recorded old paths."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
from torch import nn

from lightning_lora import LoraConfig, QuantizationConfig, apply_lora
from lightning_lora.core.legacy_paths import MOVED, OLD_PREFIX

# Where each class a pickled adapted model or config records lived before the move (module path -> old path).
OLD_PATHS = {
    "lightning_lora.core.layers.adapted_layer": "lightning_lora.core.layers",
    "lightning_lora.core.layers.containers": "lightning_lora.core.layers",
    "lightning_lora.core.layers.layer_types": "lightning_lora.core.layer_types",
    "lightning_lora.core.config.lora_config": "lightning_lora.core.config",
    "lightning_lora.core.config.adapter_config": "lightning_lora.core.config",
    "lightning_lora.core.config.quantization_config": "lightning_lora.core.config",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_imports_the_moved_module(old: str) -> None:
    assert importlib.import_module(OLD_PREFIX + old) is importlib.import_module(MOVED[old])


def _with_old_paths(data: bytes) -> bytes:
    """A protocol-2 pickle rewritten as the old layout would have written it (GLOBAL opcodes name module paths)."""
    for new, old in OLD_PATHS.items():
        data = data.replace(b"c" + new.encode() + b"\n", b"c" + old.encode() + b"\n")
    return data


def test_a_pickled_adapted_model_with_old_paths_loads_and_computes_the_same() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    apply_lora(model, LoraConfig(r=2, target_modules=["0", "2"]))
    nn.init.normal_(model[2].lora_B["default"])
    data = pickle.dumps(model, protocol=2)
    old = _with_old_paths(data)
    assert old != data and b"clightning_lora.core.layer_types\n" in old
    loaded = pickle.loads(old)
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), model(x))
    assert type(loaded[0]).__mro__[1].__module__ == "lightning_lora.core.layers.layer_types"


def test_a_pickled_config_with_old_paths_loads_equal() -> None:
    config = LoraConfig(r=4, target_modules=["q"], quantization=QuantizationConfig(bits=8))
    old = _with_old_paths(pickle.dumps(config, protocol=2))
    assert b"clightning_lora.core.config\nLoraConfig\n" in old
    assert pickle.loads(old) == config

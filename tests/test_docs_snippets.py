"""The Python snippets in docs/: every one is valid Python, and the recipes a user copies as they are run here on
small models, with the names they assume (``model``, ``base``, ``train_loader``) bound to real objects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from models import tiny_llama, token_batch
from numerics import assert_parity

from lightning_lora import LoraConfig, adapter_state_dict, apply_lora, lora_layers, quantized_layers

DOCS = Path(__file__).resolve().parents[1] / "docs"
SNIPPETS = {
    f"{path.name}#{index}": code
    for path in sorted(DOCS.glob("*.md"))
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
}


def _trained(model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """As if trained: every trainable tensor moved (frozen ones, such as PiSSA's initial factors, kept)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def _adapted(config: LoraConfig, adapter_name: str = "default", seed: int = 2) -> torch.nn.Module:
    return _trained(apply_lora(tiny_llama(), config, adapter_name), seed)


def _files() -> dict[str, Any]:
    return {"model": _adapted(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), "base_model": tiny_llama()}


def _svd_inits() -> dict[str, Any]:
    saved = _adapted(LoraConfig(init="pissa"))
    return {"base": tiny_llama(), "fresh_base": tiny_llama(), "saved_adapter_state": adapter_state_dict(saved),
            "saved": saved}  # fmt: skip


def _calibration() -> dict[str, Any]:
    loader = [{"input_ids": token_batch(seed=seed), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
              for seed in range(4)]  # fmt: skip
    return {"base": tiny_llama(), "other_base": tiny_llama(), "train_loader": loader}


def _combination() -> dict[str, Any]:
    model = _adapted(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "french")
    return {"model": _trained(apply_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), "legal"), 3)}


def _qlora() -> dict[str, Any]:
    from quantized_models import llama64

    return {"model": llama64()}


def _initialised(*models: torch.nn.Module) -> None:
    for model in models:
        layers = lora_layers(model)
        assert layers and all(layer.lora_settings["default"].initialized for _, layer in layers)
        assert all(layer.lora_A["default"].abs().sum() > 0 for _, layer in layers)


def _active(model: torch.nn.Module, names: list[str]) -> None:
    assert all(layer.active_adapters == names for _, layer in lora_layers(model))


def _quantised(model: torch.nn.Module, bits: int) -> None:
    assert len(quantized_layers(model)) == 14 and bits == 4  # 7 linear layers per block, the head left full


# Snippets run as they are: the names they assume, and what to check afterwards.
RUN: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = {
    "files.md#0": (_files, lambda ns: assert_parity(ns["model"](token_batch()).logits,
                                                    _files()["model"](token_batch()).logits)),
    "initialisation.md#0": (_svd_inits, lambda ns: assert_parity(ns["model"](token_batch()).logits,
                                                                 ns["saved"](token_batch()).logits)),
    "initialisation.md#1": (_calibration, lambda ns: _initialised(ns["model"], ns["other"])),
    "kinds.md#0": (dict, lambda ns: None),  # it asserts its own claims
    "many_adapters.md#0": (_combination, lambda ns: _active(ns["model"], ["french_legal"])),
    "qlora.md#0": (_qlora, lambda ns: _quantised(ns["model"], ns["config"].quantization.bits)),
}  # fmt: skip
# The rest are fragments of a user's own LightningModule or launch script: valid Python, run where noted.
FRAGMENTS = {
    "initialisation.md#2": "a Trainer line; CorDA through the callback: tests/test_calibration_lightning.py",
    "lightning.md#0": "the user's LightningModule; the same flow: tests/test_callback.py",
    "lightning.md#1": "the user's LoraMixin module; the same flow: tests/test_mixin.py",
    "lightning.md#2": "a 2-process Fabric script; the same calls: tests/distributed/fabric_runs.py",
    "many_adapters.md#1": "a predict_step; mixed batches: tests/test_mixed_batch.py",
    "many_adapters.md#2": "a Trainer line; O-LoRA through Lightning: tests/test_olora.py",
    "many_adapters.md#3": "a Trainer line; AM-LoRA through Lightning: tests/test_amlora.py",
    "schedules.md#0": "a Trainer line; AdaLoRA through Lightning: tests/test_adalora.py",
    "schedules.md#1": "a configure_optimizers; LoRA-FA: tests/test_lorafa.py",
}


def test_every_snippet_is_run_or_named_as_a_fragment() -> None:
    assert set(SNIPPETS) == set(RUN) | set(FRAGMENTS) and not set(RUN) & set(FRAGMENTS)
    for where in FRAGMENTS.values():
        assert (Path(__file__).parent / where.rsplit(": ", 1)[1].removeprefix("tests/")).is_file()


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_the_snippet_is_valid_python(name: str) -> None:
    compile(SNIPPETS[name], f"<docs/{name}>", "exec")


@pytest.mark.parametrize("name", sorted(RUN))
def test_the_recipe_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup, check = RUN[name]
    monkeypatch.chdir(tmp_path)  # snippets write "out/..." and "adapter/" relative paths
    namespace = {"__name__": "docs_snippet", **setup()}
    exec(compile(SNIPPETS[name], f"<docs/{name}>", "exec"), namespace)
    check(namespace)

"""Adapters with every feature on small transformers models, for the file-format tests."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from lightning_lora import LoraConfig, adapter_state_dict, apply_lora, lora_layers
from models import image_batch, randomize_adapters, small_convnet, tiny_bert, tiny_gpt2, tiny_llama, token_batch

# name: (model builder, LoraConfig arguments). Together they cover Linear, HF Conv1D, Embedding and Conv2d layers,
# rank/alpha patterns, rsLoRA, DoRA (linear, embedding, conv), modules_to_save and trained biases.
CASES: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "llama-patterns": (tiny_llama, dict(target_modules="all-linear", rank_pattern={"layers.0.*": 2},
                                        alpha_pattern={"down_proj": 3.0})),
    "llama-dora-embedding": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)),
    "gpt2-rslora-bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], use_rslora=True,
                                         bias="lora_only")),
    "bert-dora-modules_to_save": (tiny_bert, dict(target_modules=["query", "value", "dense"], use_dora=True,
                                                  modules_to_save=["classifier"], bias="all")),
    "convnet-dora": (small_convnet, dict(target_modules=["conv1", "conv2", "fc"], use_dora=True)),
}


def case_config(case: str) -> LoraConfig:
    return LoraConfig(r=4, alpha=8, **CASES[case][1])


def trained_model(case: str) -> tuple[nn.Module, nn.Module]:
    """``(base, model)``: a base model and a deep copy of it with a "trained" adapter (random adapter values and
    changed saved modules/biases)."""
    builder = CASES[case][0]
    base = builder()
    model = apply_lora(copy.deepcopy(base), case_config(case))
    randomize_adapters(model)
    perturb_saved_state(model)
    return base, model


@torch.no_grad()
def perturb_saved_state(model: nn.Module, adapter_name: str = "default") -> None:
    """Change the modules_to_save weights and trained biases, as training would."""
    generator = torch.Generator().manual_seed(5)
    for key, value in adapter_state_dict(model, adapter_name).items():
        if ".lora_" not in key:
            value.add_(0.1 * torch.randn(value.shape, generator=generator))


def inputs_for(model: nn.Module) -> torch.Tensor:
    return image_batch() if _is_image_model(model) else token_batch()


def outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs) if inputs.is_floating_point() else model(input_ids=inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _is_image_model(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave as it was: state, classes, trainability, adapters."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": [type(m) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "lora_layers": [name for name, _ in lora_layers(model)],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["lora_layers"] == before["lora_layers"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


@torch.no_grad()
def make_svd_initialised(model: nn.Module, adapter_name: str = "default", seed: int = 3) -> None:
    """Put the model in the state an SVD init (PiSSA-like) leaves, then "train" it: each layer keeps initial factors
    ``A0``/``B0`` in ``lora_init_A``/``lora_init_B`` (the team convention), its base weight holds the residual
    ``W - scaling * B0 @ A0``, and the adapter has moved away from ``(A0, B0)``."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        if adapter_name not in layer.lora_settings:
            continue
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        init_A = 0.2 * torch.randn(lora_A.shape, generator=generator)
        init_B = 0.2 * torch.randn(lora_B.shape, generator=generator)
        layer.lora_init_A = nn.ParameterDict({adapter_name: nn.Parameter(init_A, requires_grad=False)})
        layer.lora_init_B = nn.ParameterDict({adapter_name: nn.Parameter(init_B, requires_grad=False)})
        principal = layer.scaling(adapter_name) * (init_B.flatten(1) @ init_A.flatten(1))
        layer.weight.sub_(layer.weight_out_in(principal))
        lora_A.copy_(init_A + 0.05 * torch.randn(lora_A.shape, generator=generator))
        lora_B.copy_(init_B + 0.05 * torch.randn(lora_B.shape, generator=generator))

"""The table of adapter kinds that the generic contract tests and the PEFT parity tests run over.

Adding a kind adds a row: our config and the same adapter as a PEFT config (with PEFT's non-identity init), and the
PEFT-style small models it runs on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from peft_boft import use_torch_block_diag_in_peft
from torch import nn

from lightning_lora import (
    AdaLoraConfig,
    AdapterConfig,
    BOFTConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    VBLoRAConfig,
    VeraConfig,
)

use_torch_block_diag_in_peft()  # PEFT's butterfly factors > 1 otherwise need its CUDA extension (peft_boft.py)


class MLP(nn.Module):
    """PEFT's test MLP shape: two adapted linears and an unadapted head (input sizes divisible by 4, for OFT)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.lin1 = nn.Linear(20, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.lin0 = nn.Linear(36, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 4, 8]
        return self.lin0(torch.relu(self.conv(x)).flatten(1))


class Conv2dNet(nn.Module):
    """A 3x3 convolution, a 1x1 (pointwise) one and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.lin0 = nn.Linear(12 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 4, 6, 6]
        return self.lin0(torch.relu(self.pointwise(torch.relu(self.conv(x)))).flatten(1))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.lin0 = nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [batch, length]
        return self.lin0(self.embed(ids))


class HFConv1DNet(nn.Module):
    """GPT-2's Hugging Face ``Conv1D`` layers (weight stored ``[in, out]``)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin0 = Conv1D(20, 12)  # nf (out), nx (in)
        self.lin1 = Conv1D(8, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


# name: (builder, adapted layers, input shape; token ids for the embedding model)
MODELS: dict[str, tuple[Callable[[], nn.Module], list[str], tuple[int, ...]]] = {
    "mlp": (MLP, ["lin0", "lin1"], (4, 12)),
    "conv1d": (Conv1dNet, ["conv", "lin0"], (3, 4, 8)),
    "conv2d": (Conv2dNet, ["conv", "pointwise", "lin0"], (2, 4, 6, 6)),
    "embedding": (EmbeddingNet, ["embed", "lin0"], (2, 5)),
    "hf-conv1d": (HFConv1DNet, ["lin0", "lin1"], (4, 12)),
}


@dataclass
class KindCase:
    """One row: our config class and fields, PEFT's config class name and fields for the same adapter."""

    config_class: type[AdapterConfig]
    fields: dict[str, Any]
    peft_class: str
    peft_fields: dict[str, Any]
    models: tuple[str, ...] = ("mlp", "conv1d", "conv2d")
    # Models on which PEFT's own unmerged forward is known wrong (PEFT's merged weights are compared instead).
    peft_forward_wrong_on: tuple[str, ...] = ()
    # A layer the kind cannot adapt (None: it adapts every supported layer type).
    unsupported_layer: Optional[Callable[[], nn.Module]] = lambda: nn.Embedding(10, 8)
    # Containers whose gradient PEFT computes wrongly on layers with a CP core (see test_kinds for the proof).
    peft_wrong_cp_gradients: tuple[str, ...] = ()
    # False for a kind whose method starts away from the identity (VB-LoRA mixes a random bank from the start).
    starts_at_identity: bool = True

    def config(self, targets: list[str], **overrides: Any) -> AdapterConfig:
        return self.config_class(target_modules=targets, **{**self.fields, **overrides})

    def peft_config(self, targets: list[str]) -> Any:
        import peft

        return getattr(peft, self.peft_class)(target_modules=targets, **self.peft_fields)


KIND_CASES: dict[str, KindCase] = {
    "lora": KindCase(
        LoraConfig, dict(r=4, alpha=8), "LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False),
        models=tuple(MODELS), unsupported_layer=None,
    ),
    "dora": KindCase(
        LoraConfig, dict(r=4, alpha=8, use_dora=True),
        "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False), unsupported_layer=None,
    ),
    "loha": KindCase(
        LoHaConfig, dict(r=3, alpha=6), "LoHaConfig", dict(r=3, alpha=6, init_weights=False),
    ),
    "loha-effective-conv": KindCase(
        LoHaConfig, dict(r=2, alpha=3, use_effective_conv2d=True),
        "LoHaConfig", dict(r=2, alpha=3, use_effective_conv2d=True, init_weights=False),
        peft_wrong_cp_gradients=("hada_w1_a", "hada_w2_a"),
    ),
    "lokr": KindCase(
        LoKrConfig, dict(r=2, alpha=4), "LoKrConfig", dict(r=2, alpha=4, init_weights=False),
    ),
    "lokr-decomposed": KindCase(
        LoKrConfig, dict(r=1, alpha=2, decompose_both=True, use_effective_conv2d=True, decompose_factor=4),
        "LoKrConfig",
        dict(r=1, alpha=2, decompose_both=True, use_effective_conv2d=True, decompose_factor=4, init_weights=False),
    ),
    "oft": KindCase(
        OFTConfig, dict(oft_block_size=4), "OFTConfig", dict(r=0, oft_block_size=4, init_weights=False),
        models=("mlp", "conv2d", "embedding"), peft_forward_wrong_on=("conv2d",),
        unsupported_layer=lambda: nn.Conv1d(8, 8, 1),
    ),
    "oft-exact-cayley-shared-coft": KindCase(
        OFTConfig, dict(r=2, oft_block_size=0, use_cayley_neumann=False, block_share=True, coft=True, eps=0.5),
        "OFTConfig",
        dict(r=2, oft_block_size=0, use_cayley_neumann=False, block_share=True, coft=True, eps=0.5,
             init_weights=False),
        models=("mlp", "embedding"), unsupported_layer=lambda: nn.Conv1d(8, 8, 1),
    ),
    "vera": KindCase(
        VeraConfig, dict(r=4), "VeraConfig", dict(r=4, init_weights=False), models=("mlp", "hf-conv1d"),
    ),
    "vera-projection-from-key": KindCase(
        VeraConfig, dict(r=6, projection_prng_key=3, save_projection=False, d_initial=0.5),
        "VeraConfig", dict(r=6, projection_prng_key=3, save_projection=False, d_initial=0.5, init_weights=False),
        models=("mlp",),
    ),
    "adalora": KindCase(
        AdaLoraConfig, dict(init_r=4, target_r=2, alpha=6, total_step=10), "AdaLoraConfig",
        dict(init_r=4, target_r=2, lora_alpha=6, total_step=10, init_lora_weights=False),
        models=("mlp", "hf-conv1d", "conv2d"),
    ),
    "boft": KindCase(
        BOFTConfig, dict(boft_block_size=4), "BOFTConfig", dict(boft_block_size=4, init_weights=False),
        models=("mlp", "conv2d"),
    ),
    "boft-butterfly": KindCase(
        BOFTConfig, dict(boft_block_size=2, boft_n_butterfly_factor=2),
        "BOFTConfig", dict(boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False),
        models=("mlp", "conv2d"), unsupported_layer=lambda: nn.Conv1d(8, 8, 1),
    ),
}

KIND_CASES["vblora"] = KindCase(  # vector_length 4 divides every adapted layer's features
    VBLoRAConfig, dict(r=3, num_vectors=8, vector_length=4, topk=2, init_vector_bank_bound=0.5),
    "VBLoRAConfig", dict(r=3, num_vectors=8, vector_length=4, topk=2, init_vector_bank_bound=0.5),
    models=("mlp", "hf-conv1d"), starts_at_identity=False,
)

CASE_MODEL_PAIRS = [(case, model) for case, row in KIND_CASES.items() for model in row.models]


def build(model_name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_name][0]()


def model_input(model_name: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if model_name == "embedding":
        return torch.randint(0, 30, MODELS[model_name][2], generator=generator)
    return torch.randn(MODELS[model_name][2], generator=generator)


def targets(model_name: str) -> list[str]:
    return list(MODELS[model_name][1])


def randomized(model: nn.Module, seed: int = 3) -> nn.Module:
    """Give every trainable adapter tensor random values (DoRA magnitudes: a random rescaling)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.mul_(1 + 0.1 * noise) if "lora_magnitude" in name else parameter.copy_(0.3 * noise)
    return model


def deep(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

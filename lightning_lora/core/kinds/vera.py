"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

One pair of frozen random projections ``A: [r, max_in]`` and ``B: [max_out, r]`` serves every adapted layer (each
uses the top-left block its size needs); only two vectors per layer train: ``x -> base(x) + b * (B (d * (A x)))``
with ``d: [r]`` and ``b: [out]``. The projections come from ``projection_prng_key`` (PEFT's generator and bounds, so
the same key gives PEFT's matrices bit for bit), are held once in memory (a
:class:`~lightning_lora.core.layers.adapted_layer.SharedTensors` child of every adapted layer) and once in files
(``save_projection``), and never in state dicts or checkpoints: the key rebuilds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.config.adapter_config import TARGETING_ARGS, AdapterConfig
from lightning_lora.core.config.fields import check_dropout
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor, refuse_meta_targets
from lightning_lora.core.layers.layer_types import LinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer


@dataclass(kw_only=True)
class VeraConfig(AdapterConfig):
    __doc__ = """Configuration of one VeRA adapter (PEFT's ``VeraConfig``).

    Adapts ``nn.Linear`` and Hugging Face ``Conv1D``.

    Args:
        r: Rank of the shared random projections (PEFT's default 256; VeRA trains only ``r + out`` numbers per
            layer, so it affords a large rank).""" + TARGETING_ARGS + """
        projection_prng_key: Seed of the shared projections.
        save_projection: Write the projections into adapter files (PEFT's default); otherwise a load rebuilds them
            from ``projection_prng_key``.
        vera_dropout: Dropout on the adapter's input, in ``[0, 1)``.
        d_initial: Initial value of every entry of the ``d`` vectors: finite, and not 0 with ``init_weights`` (``b``
            starts at zero, so ``d = 0`` would leave both vectors without gradient for ever).
        init_weights: True: ``b`` starts at zero (outputs unchanged) and ``d`` at ``d_initial``; False: ``b`` ones
            and ``d`` standard normal (for tests).
    """

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}.")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an integer, got {self.projection_prng_key!r}.")
        check_dropout("vera_dropout", self.vera_dropout)
        if not is_finite_number(self.d_initial):
            raise ValueError(f"d_initial must be a finite number, got {self.d_initial!r}; PEFT's default is 0.1.")
        if self.init_weights and self.d_initial == 0:
            raise ValueError(
                "d_initial=0 with init_weights=True starts both trained vectors at zero (b = 0 and d = 0), so both "
                "get zero gradients and the adapter never trains. Use a non-zero d_initial, e.g. PEFT's 0.1."
            )

    @property
    def kind(self) -> str:
        return "vera"

    def rank_for(self, module_name: str) -> int:
        return self.r


def vera_projections(config: VeraConfig, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, max_in], B [max_out, r])`` from ``projection_prng_key``: Kaiming-uniform draws from one CPU generator,
    ``A`` first, with PEFT's bound ``sqrt(3) * sqrt(2) / sqrt(fan_in)``."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    projections = []
    for shape in ((config.r, max_in), (max_out, config.r)):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        projections.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return projections[0], projections[1]


class VeraKind(AdapterKind):
    """Per layer ``vera_lambda_b`` ``[out]`` and ``vera_lambda_d`` ``[r]``; shared ``vera_A`` and ``vera_B``."""

    name = "vera"
    display_name = "VeRA"
    peft_type = "VERA"
    containers: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B")
    config_class = VeraConfig
    peft_alpha_field = None
    peft_bias_only = "vera_only"
    peft_fields = frozenset({
        "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights", "bias",
        "fan_in_fan_out",
    })

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        out_features = layer.lora_dims()[1]
        return [AdapterTensor("vera_lambda_b", (out_features,)), AdapterTensor("vera_lambda_d", (settings.r,))]

    def shared_tensors(self, config: VeraConfig, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
        refuse_meta_targets(self, "shared projections", targets)
        sizes = [layer_type_of(module).lora_dims(module) for _, module in targets]
        A, B = vera_projections(config, max(s[0] for s in sizes), max(s[1] for s in sizes))
        weight = targets[0][1].weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return {"vera_A": A.to(weight.device, dtype), "vera_B": B.to(weight.device, dtype)}

    def saves_shared(self, config: VeraConfig) -> bool:
        return config.save_projection

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        if layer_type_of(module) is None or not issubclass(layer_type_of(module), LinearAdapters):
            raise ValueError(
                f"A VeRA adapter cannot go on {layer_name} ({type(module).__name__}): VeRA adapts nn.Linear and "
                "Hugging Face Conv1D (as PEFT). Leave it out with exclude_modules, or use LoraConfig for it."
            )

    def layer_dropout(self, config: VeraConfig) -> float:
        return config.vera_dropout

    def scaling(self, settings: AdapterSettings) -> float:
        return 1.0  # the trained vectors carry the scale

    def describe(self, settings: AdapterSettings) -> str:
        return f"vera, r={settings.r}"

    @torch.no_grad()
    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        config = layer.lora_settings[adapter_name].config
        lambda_b, lambda_d = layer.vera_lambda_b[adapter_name], layer.vera_lambda_d[adapter_name]
        if config.init_weights:
            lambda_b.zero_()
            lambda_d.fill_(config.d_initial)
        else:
            lambda_b.fill_(1.0)
            lambda_d.normal_()

    def _projections(self, layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        in_features, out_features, _ = layer.lora_dims()
        return layer.vera_A[adapter_name][:, :in_features], layer.vera_B[adapter_name][:out_features, :]

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        settings = layer.lora_settings[adapter_name]
        lambda_b, lambda_d = layer.vera_lambda_b[adapter_name], layer.vera_lambda_d[adapter_name]
        A, B = self._projections(layer, adapter_name)
        h = layer.adapter_input(x, settings.dropout, lambda_d.dtype)
        update = lambda_b * F.linear(lambda_d * F.linear(h, A), B)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``(b * B) @ (d * A)`` in the base weight's layout."""
        A, B = self._projections(layer, adapter_name)
        lambda_b, lambda_d = layer.vera_lambda_b[adapter_name], layer.vera_lambda_d[adapter_name]
        return layer.to_weight_layout((lambda_b.unsqueeze(-1) * B) @ (lambda_d.unsqueeze(-1) * A))

    def peft_config_fields(self, config: VeraConfig) -> dict[str, Any]:
        return {
            "r": config.r,
            "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection,
            "vera_dropout": config.vera_dropout,
            "d_initial": config.d_initial,
            "bias": self.peft_bias(config),
            "init_weights": config.init_weights,
        }


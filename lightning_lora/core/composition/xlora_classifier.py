"""X-LoRA's config and its classifier: a hidden state in, one weight per position, adapted layer and expert out
(PEFT's ``XLoraConfig`` and ``XLoraClassifier``, with its top-k and softmax rules)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from lightning_lora.core.common.checks import is_finite_number, is_integer
from lightning_lora.core.config.fields import check_dropout


@dataclass
class XLoraConfig:
    """How the X-LoRA gate is built and applied (PEFT's ``XLoraConfig`` fields, same defaults).

    Args:
        hidden_size: Width of the hidden state the classifier reads (default: ``model.config.hidden_size``).
        enable_softmax: Softmax over the experts of the classifier's logits (divided by ``softmax_temperature``).
        enable_softmax_topk: Softmax over the experts kept by ``top_k_lora`` only (needs ``top_k_lora``).
        softmax_temperature: Temperature of ``enable_softmax``; lower is sharper.
        layerwise_scalings: One set of weights per adapted layer; False: one set shared by every layer.
        top_k_lora: Keep the ``k`` largest weights per position and layer, zero the others (None: all experts).
        xlora_depth: Number of linear layers of the classifier (ReLU and dropout between them).
        xlora_size: Width of the classifier's inner layers (unused when ``xlora_depth == 1``).
        xlora_dropout_p: Dropout between the classifier's layers (unused when ``xlora_depth == 1``).
        use_trainable_adapters: Let the experts train too; by default only the classifier trains.
        scaling_pass_value: Weight of every expert in the scalings pass (None: ``1 / number of experts``).
        global_scaling_weight: Factor on every expert's output in the scaled pass.
    """

    hidden_size: Optional[int] = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: Optional[int] = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    scaling_pass_value: Optional[float] = 0.0
    global_scaling_weight: float = 1.0

    kind: ClassVar[str] = "xlora"
    #: Fields a resumed run may change (checkpoint checks compare the others).
    filled_in_training: ClassVar[tuple[str, ...]] = ("xlora_dropout_p",)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __post_init__(self) -> None:
        if not (is_integer(self.xlora_depth) and self.xlora_depth >= 1):
            raise ValueError(f"xlora_depth must be an integer >= 1 (one linear layer), got {self.xlora_depth!r}.")
        if self.hidden_size is not None and not (is_integer(self.hidden_size) and self.hidden_size >= 1):
            raise ValueError(f"hidden_size must be a positive integer (or None), got {self.hidden_size!r}.")
        if not (is_integer(self.xlora_size) and self.xlora_size >= 1):
            raise ValueError(f"xlora_size must be a positive integer, got {self.xlora_size!r}.")
        check_dropout("xlora_dropout_p", self.xlora_dropout_p)
        if not (is_finite_number(self.softmax_temperature) and self.softmax_temperature > 0):
            raise ValueError(
                f"softmax_temperature must be positive and finite, got {self.softmax_temperature!r}; 1.0 is a plain "
                "softmax."
            )
        if self.top_k_lora is not None and not (is_integer(self.top_k_lora) and self.top_k_lora >= 1):
            raise ValueError(f"top_k_lora must be an integer >= 1 (or None for every expert), got {self.top_k_lora!r}.")
        if self.scaling_pass_value is not None and not is_finite_number(self.scaling_pass_value):
            raise ValueError(
                f"scaling_pass_value must be a finite number (or None for 1 / number of experts), got "
                f"{self.scaling_pass_value!r}."
            )
        if not is_finite_number(self.global_scaling_weight):
            raise ValueError(
                f"global_scaling_weight must be a finite number (PEFT's default 1.0), got "
                f"{self.global_scaling_weight!r}."
            )
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ValueError("enable_softmax_topk needs top_k_lora: set top_k_lora=k, or enable_softmax instead.")
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn(
                "enable_softmax_topk and enable_softmax are both set: the weights are normalised twice.", stacklevel=3
            )


class XLoraClassifier(nn.Module):
    """Hidden state ``[..., hidden_size]`` to expert weights ``[..., n_layers, n_experts]`` (PEFT's layout: a
    ``layers`` ``nn.Sequential`` of ``xlora_depth`` linear layers, ReLU and dropout between them).

    Args:
        config: The X-LoRA config (``hidden_size`` resolved).
        n_experts: Number of experts.
        n_layers: Number of adapted layers the weights are for.
    """

    is_adapter_machinery = True  # never an adapter target (targeting)

    def __init__(self, config: XLoraConfig, n_experts: int, n_layers: int) -> None:
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        outputs = n_experts * n_layers if config.layerwise_scalings else n_experts
        widths = [config.hidden_size] + [config.xlora_size] * (config.xlora_depth - 1)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
            if config.xlora_dropout_p > 0.0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
        self.layers = nn.Sequential(*layers, nn.Linear(widths[-1], outputs))

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden_state)
        lead = hidden_state.shape[:-1]
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(-2).expand(*lead, self.n_layers, self.n_experts)
        scalings = logits.reshape(*lead, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


def top_k_weights(config: XLoraConfig, scalings: torch.Tensor) -> torch.Tensor:
    """PEFT's per-layer weights: the ``top_k_lora`` largest kept, then (``enable_softmax_topk``) a softmax over them."""
    if config.top_k_lora is not None:
        indices = torch.topk(scalings, k=config.top_k_lora, dim=-1).indices
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, indices, True)
        scalings = scalings * mask.to(scalings.dtype)
    if config.enable_softmax_topk:
        kept = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
    return scalings

"""AM-LoRA's attentional selector: per adapted layer, a dense score per task adapter on that adapter's low-rank
features, turned into the tasks' weights by a softmax or a ReLU (:mod:`lightning_lora.core.composition.amlora`)."""

from __future__ import annotations

import torch
from torch import nn


class LayerSelector(nn.Module):
    """The attentional selector of one adapted layer: per task adapter a dense layer ``f -> w·f + b``.

    Parameters are ``weight[adapter]`` (``[out_features]``), ``bias[adapter]`` (a scalar) and, for ``"softmax"``,
    ``zero_score`` (the zero LoRA's score).

    Args:
        out_features: Width of the layer's output (the adapters' features).
        gate: ``"softmax"`` or ``"relu"``.
        like: A tensor of the layer's adapters: the selector takes its dtype and device.
    """

    def __init__(self, out_features: int, gate: str, like: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.gate = out_features, gate
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        factory = {"dtype": like.dtype, "device": like.device}
        self.zero_score = nn.Parameter(torch.zeros((), **factory)) if gate == "softmax" else None

    def add(self, adapter_name: str, like: torch.Tensor) -> None:
        """Add a task's dense layer: weight 0, bias 0 (``"softmax"``: every slot scores alike) or 1 (``"relu"``)."""
        factory = {"dtype": like.dtype, "device": like.device}
        self.weight[adapter_name] = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.bias[adapter_name] = nn.Parameter(torch.full((), 1.0 if self.gate == "relu" else 0.0, **factory))

    def score(self, adapter_name: str, features: torch.Tensor) -> torch.Tensor:
        """``w·f + b`` for the adapter's features ``f`` (``[..., out_features]``)."""
        weight = self.weight[adapter_name]
        return features.to(weight.dtype) @ weight + self.bias[adapter_name]

    def low_rank_score(self, adapter_name: str, h: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """The same score for a LoRA whose features are ``f = B h``, computed as ``(Bᵀ w)·h`` (rank-``r`` work)."""
        weight = self.weight[adapter_name]
        return h.to(weight.dtype) @ (lora_B.to(weight.dtype).T @ weight) + self.bias[adapter_name]

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """The weights of scores ``[..., n]``, with the zero LoRA's share first for ``"softmax"`` (``[..., 1 + n]``)."""
        if self.zero_score is None:
            return torch.relu(scores)
        zero = self.zero_score.to(scores.dtype).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([zero, scores], dim=-1), dim=-1)


class AttentionalSelector(nn.Module):
    """``model.amlora_selector``: one :class:`LayerSelector` per adapted layer, keyed by the layer's name with
    ``.`` written ``-`` and ``-selector`` appended (``encoder-layer-0-attention-self-query-selector``), so that no
    ``target_modules`` name or pattern of a later task selects it."""

    is_adapter_machinery = True  # never an adapter target (targeting)

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate
        self.layers = nn.ModuleDict()

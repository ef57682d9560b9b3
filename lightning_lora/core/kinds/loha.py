"""LoHa: the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098).

``delta W = scaling * (W1a @ W1b) * (W2a @ W2b)`` (element-wise ``*``), ``scaling = alpha / r``; the layer computes
``base(x) + base_op(x, delta W)``, so the update has rank up to ``r**2`` for ``4 * r * (out + in)`` parameters. On
convolutions the factors cover ``in * kernel`` (``W1b: [r, in * k]``) or, with ``use_effective_conv2d``, a CP
decomposition with cores ``T1, T2: [r, r, *kernel]`` (as LyCORIS and PEFT). Same tensors and numbers as PEFT's LoHa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lightning_lora.core.config.adapter_config import LOW_RANK_ARGS, TARGETING_ARGS
from lightning_lora.core.kinds.base import AdapterTensor
from lightning_lora.core.kinds.lycoris import LYCORIS_ARGS, LycorisConfig, LycorisKind

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer


@dataclass(kw_only=True)
class LoHaConfig(LycorisConfig):
    __doc__ = """Configuration of one LoHa adapter (PEFT's ``LoHaConfig``).

    Adapts ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``. Rank dropout rescales the rows it keeps.

    Args:""" + LOW_RANK_ARGS + TARGETING_ARGS + LYCORIS_ARGS + """
        init_weights: True: the update starts at zero (``hada_w2_b`` zero); False: random, non-zero (for tests).
    """

    init_weights: bool = True

    @property
    def kind(self) -> str:
        return "loha"


class LoHaKind(LycorisKind):
    """Four factors ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and CP cores ``hada_t1``,
    ``hada_t2``) per layer."""

    name = "loha"
    display_name = "LoHa"
    peft_type = "LOHA"
    containers: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    config_class = LoHaConfig
    peft_fields = frozenset({"rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"})
    rescales_rank_dropout = True

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        r = settings.r
        in_features, out_features, kernel = layer.weight_dims()
        if self.uses_cp(layer, settings.config):
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            shapes = [(r, out_features), (r, in_features)] * 2 + [core, core]
        else:
            flat_in = in_features * math.prod(kernel)
            shapes = [(out_features, r), (r, flat_in)] * 2
        return [AdapterTensor(name, shape) for name, shape in zip(self.containers, shapes)]

    @torch.no_grad()
    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        # PEFT's order: w1_a, w1_b, w2_a, then w2_b (zero unless init_weights=False), then the CP cores.
        config = layer.lora_settings[adapter_name].config
        for name in layer.adapter_containers(adapter_name):
            tensor = getattr(layer, name)[adapter_name]
            if name == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def dense_delta(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if "hada_t1" in t:
            first = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            second = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            return first * second
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])

    def peft_config_fields(self, config: LoHaConfig) -> dict[str, Any]:
        return {
            "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout,
            "use_effective_conv2d": config.use_effective_conv2d,
            "init_weights": config.init_weights,
        }


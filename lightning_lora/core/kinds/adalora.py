"""AdaLoRA: LoRA in SVD form whose ranks are re-allocated during training (Zhang et al. 2023,
https://arxiv.org/abs/2303.10512).

``delta W = B diag(E) A * alpha / (init_r + 1e-5)`` with ``A: [init_r, in]`` (right singular vectors), ``E: [init_r,
1]`` (singular values) and ``B: [out, init_r]`` (left singular vectors); on a convolution ``A`` is ``[init_r,
in_channels * kernel]`` (PEFT's layout) and acts as a convolution with the base's kernel. The layers always hold
``init_r`` ranks; a rank is pruned by zeroing its singular value. Which ranks survive is decided during training by
:class:`~lightning_lora.core.training.rank_allocation.RankAllocator` (the ``AdaLoraSchedule`` callback runs it), and
the final allocation is kept in ``AdaLoraConfig.rank_pattern``. PEFT's ``ADALORA`` files hold only the surviving ranks
with that pattern: they are written and read both ways. Same tensors and numbers as PEFT's AdaLoRA.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.common.distributed import full_tensor
from lightning_lora.core.config.adapter_config import TARGETING_ARGS, AdapterConfig
from lightning_lora.core.config.fields import check_dropout
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor
from lightning_lora.core.layers.layer_types import ConvAdapters, LinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

_PEFT_NAMES = {"delta_t": "deltaT", "alpha": "lora_alpha", "dropout": "lora_dropout"}


@dataclass(kw_only=True)
class AdaLoraConfig(AdapterConfig):
    __doc__ = (
        """Configuration of one AdaLoRA adapter (PEFT's ``AdaLoraConfig``).

    Adapts ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d`` (as PEFT). A rank above what a layer can hold
    (``min(in, out)``; ``in`` counts the kernel on a convolution) is accepted, as PEFT does, with a warning: the
    extra ranks cost parameters and budget but add nothing the update can express. The budget schedule runs when
    ``AdaLoraSchedule`` is among the Trainer's callbacks: ``tinit`` warm-up steps at ``init_r`` per layer, then a
    cubic decrease of the total rank to ``target_r`` per layer on average until ``total_step - tfinal``,
    re-allocated every ``delta_t`` steps, then ``tfinal`` steps with the final allocation fixed.

    Args:
        init_r: Rank every layer starts with.
        target_r: Average rank per layer at the end.
        alpha: Scale numerator: the update is multiplied by ``alpha / init_r`` (as PEFT, ``init_r`` even after
            pruning)."""
        + TARGETING_ARGS
        + """
        dropout: Dropout on the adapter's input, in ``[0, 1)``.
        tinit: Warm-up steps before ranks are pruned.
        tfinal: Final steps with the allocation fixed.
        delta_t: Steps between two re-allocations.
        beta1: EMA factor of the sensitivity (importance) of each entry, in ``(0, 1)``.
        beta2: EMA factor of its uncertainty, in ``(0, 1)``.
        orth_reg_weight: Weight of the orthogonality penalty ``||A A^T - I|| + ||B^T B - I||`` (averaged over the
            matrices) added to the training loss by the schedule; 0 turns it off.
        total_step: Optimizer steps of the run; default: the Trainer's ``estimated_stepping_batches``.
        rank_pattern: The final allocation, ``{layer name: [kept, ...]}`` with ``init_r`` booleans per layer. Filled
            in by the schedule and by PEFT files; leave it unset when training.
        init_weights: True: ``E`` starts at zero (outputs unchanged), ``A`` and ``B`` normal with std 0.02; False:
            all standard normal (for tests).
    """
    )

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict[str, list[bool]]] = None
    init_weights: bool = True

    #: Fields the schedule fills in during training (a resumed run's config need not have them).
    filled_in_training: ClassVar[tuple[str, ...]] = ("rank_pattern",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "delta_t"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("tinit", "tfinal"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only prunes ranks. Start with "
                "init_r >= target_r (PEFT's default: init_r=12, target_r=8)."
            )
        if not (is_finite_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be > 0 and finite, got {self.alpha!r}.")
        self.alpha = float(self.alpha)
        check_dropout("dropout", self.dropout)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (is_finite_number(value) and 0 < value < 1):
                raise ValueError(f"{name} must be in (0, 1), got {value!r}; PEFT's default is 0.85.")
        if not (is_finite_number(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(
                f"orth_reg_weight must be >= 0 and finite, got {self.orth_reg_weight!r}; 0 turns the penalty off."
            )
        if self.total_step is not None:
            _check_int("total_step", self.total_step, minimum=1)
            check_schedule(self, self.total_step)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ValueError(f"rank_pattern must be a dict {{layer name: [bool, ...]}}, got {self.rank_pattern!r}.")
            for key, kept in self.rank_pattern.items():
                if (
                    not isinstance(kept, (list, tuple))
                    or len(kept) != self.init_r
                    or any(k not in (True, False) or not isinstance(k, (bool, int)) for k in kept)
                ):
                    raise ValueError(
                        f"rank_pattern[{key!r}] must hold init_r={self.init_r} booleans (one per rank), got {kept!r}."
                    )
            self.rank_pattern = {key: [bool(k) for k in kept] for key, kept in self.rank_pattern.items()}

    @property
    def kind(self) -> str:
        return "adalora"

    def rank_for(self, module_name: str) -> int:
        return self.init_r

    def alpha_for(self, module_name: str) -> float:
        return self.alpha


def check_schedule(config: AdaLoraConfig, total_step: int) -> None:
    """Raise a ValueError naming the fix unless the schedule leaves a budgeting phase (PEFT's rule)."""
    if config.tinit >= total_step - config.tfinal:
        raise ValueError(
            f"The AdaLoRA schedule leaves no steps to re-allocate ranks: tinit={config.tinit} >= total_step "
            f"({total_step}) - tfinal ({config.tfinal}). Lower tinit or tfinal, or train for more steps."
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


class AdaLoraKind(AdapterKind):
    """``lora_A`` ``[init_r, in]``, ``lora_E`` ``[init_r, 1]`` and ``lora_B`` ``[out, init_r]``."""

    name = "adalora"
    display_name = "AdaLoRA"
    peft_type = "ADALORA"
    rank_budget = True
    containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")
    config_class = AdaLoraConfig
    peft_alpha_field = None
    peft_fields = frozenset(
        {
            "init_r",
            "target_r",
            "lora_alpha",
            "lora_dropout",
            "tinit",
            "tfinal",
            "deltaT",
            "beta1",
            "beta2",
            "orth_reg_weight",
            "total_step",
            "rank_pattern",
            "init_lora_weights",
            "bias",
            "r",
            "fan_in_fan_out",
        }
    )

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        in_features, out_features, kernel = layer.lora_dims()
        r = settings.r
        return [
            AdapterTensor("lora_A", (r, in_features * math.prod(kernel))),
            AdapterTensor("lora_E", (r, 1)),
            AdapterTensor("lora_B", (out_features, r)),
        ]

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)
        is_conv2d = layer_type is ConvAdapters and isinstance(module, nn.Conv2d)
        if layer_type is None or not (issubclass(layer_type, LinearAdapters) or is_conv2d):
            raise ValueError(
                f"An AdaLoRA adapter cannot go on {layer_name} ({type(module).__name__}): AdaLoRA adapts nn.Linear, "
                "Hugging Face Conv1D and nn.Conv2d (as PEFT). Leave it out with exclude_modules, or use LoraConfig "
                "for it."
            )
        if is_conv2d and module.groups > 1:
            raise ValueError(
                f"An AdaLoRA adapter cannot go on {layer_name}, a grouped convolution (groups={module.groups}): its "
                "SVD factors link every input channel to every output channel, which the grouped kernel cannot hold "
                "(PEFT's AdaLoRA cannot build it either). Leave it out with exclude_modules, or use LoraConfig for it."
            )
        in_features, out_features, kernel = layer_type.lora_dims(module)
        usable = min(in_features * math.prod(kernel), out_features)
        if settings.r > usable:  # as PEFT: the product's rank is only capped
            warnings.warn(
                f"AdaLoRA rank init_r={settings.r} on {layer_name} can use at most {usable} ranks; the other "
                f"{settings.r - usable} add parameters and take rank budget but nothing the update can express.",
                stacklevel=2,
            )

    def layer_dropout(self, config: AdaLoraConfig) -> float:
        return config.dropout

    def scaling(self, settings: AdapterSettings) -> float:
        return settings.alpha / (settings.r + 1e-5)

    def describe(self, settings: AdapterSettings) -> str:
        return f"adalora, init_r={settings.r}, alpha={settings.alpha:g}"

    @torch.no_grad()
    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        config = layer.lora_settings[adapter_name].config
        A, E, B = (getattr(layer, name)[adapter_name] for name in self.containers)
        if config.init_weights:
            E.zero_()
            A.normal_(0.0, 0.02)
            B.normal_(0.0, 0.02)
        else:
            for tensor in (A, E, B):
                tensor.normal_()

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        settings = layer.lora_settings[adapter_name]
        A, E, B = (getattr(layer, name)[adapter_name] for name in self.containers)
        h = layer.adapter_input(x, settings.dropout, A.dtype)
        weighted = A * E
        if isinstance(layer, ConvAdapters):  # PEFT's flat [r, in * kernel] as a kernel; linear layers need no view
            shape_A, shape_B = layer.adapter_shapes(settings.r)
            weighted, B = weighted.view(shape_A), B.view(shape_B)
        update = layer.lora_output(h, weighted, B, settings.scaling)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        A, E, B = (getattr(layer, name)[adapter_name] for name in self.containers)
        shape_A, shape_B = layer.adapter_shapes(layer.lora_settings[adapter_name].r)
        product = layer.low_rank_product((A * E).view(shape_A), B.view(shape_B))
        return layer.to_weight_layout(product * layer.scaling(adapter_name))

    # ----- PEFT -----
    def peft_export(self, layer: LoraLayer, adapter_name: str) -> tuple[dict[str, torch.Tensor], int, float]:
        """Only the ranks that survived (non-zero singular values) once the allocation is final, as PEFT writes."""
        tensors, r, alpha = super().peft_export(layer, adapter_name)
        if layer.lora_settings[adapter_name].config.rank_pattern is None:
            return tensors, r, alpha
        kept = surviving_ranks(layer, adapter_name)
        return (
            {
                "lora_A": tensors["lora_A"][kept],
                "lora_E": tensors["lora_E"][kept],
                "lora_B": tensors["lora_B"][:, kept],
            },
            r,
            alpha,
        )

    def peft_layer_fields(self, adapter_name: str, config: AdaLoraConfig, layers: list[tuple[str, LoraLayer]]) -> dict:
        if config.rank_pattern is None:
            return {"rank_pattern": None}
        return {
            "rank_pattern": {f"{name}.lora_E": surviving_ranks(layer, adapter_name).tolist() for name, layer in layers}
        }

    def peft_file_shapes(
        self, layer: LoraLayer, settings: AdapterSettings, layer_name: str, peft_config: Mapping[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        kept = _peft_kept(peft_config, layer_name)
        r = settings.r if kept is None else sum(kept)
        in_features, out_features, kernel = layer.lora_dims()
        return {"lora_A": (r, in_features * math.prod(kernel)), "lora_E": (r, 1), "lora_B": (out_features, r)}

    def peft_import_tensor(
        self, layer: LoraLayer, adapter_name: str, layer_name: str, container: str, value: torch.Tensor
    ) -> torch.Tensor:
        """Put a PEFT tensor of the surviving ranks back at their places among ``init_r`` (pruned ranks zero)."""
        config = layer.lora_settings[adapter_name].config
        kept = (config.rank_pattern or {}).get(layer_name)
        rank_dim = 1 if container == "lora_B" else 0
        if kept is None or value.dim() <= rank_dim:
            return value  # the shape check after the import reports what does not fit
        if value.shape[rank_dim] != sum(kept):
            raise ValueError(
                f"{layer_name}: rank_pattern keeps {sum(kept)} of {len(kept)} ranks, but the file's {container} holds "
                f"{value.shape[rank_dim]}. A PEFT AdaLoRA file holds exactly the kept ranks, so this file contradicts "
                "itself (PEFT refuses it too); export the adapter again from the model it was trained on."
            )
        if sum(kept) == len(kept):
            return value
        index = torch.tensor(kept, dtype=torch.bool)
        shape = list(value.shape)
        shape[rank_dim] = len(kept)
        full = value.new_zeros(shape)
        if rank_dim == 0:
            full[index] = value
        else:
            full[:, index] = value
        return full

    def check_file_state(
        self,
        adapter_name: str,
        config: AdaLoraConfig,
        layers: list[tuple[str, LoraLayer]],
        state: Mapping[str, torch.Tensor],
    ) -> None:
        """``rank_pattern`` must name adapted layers only, and the ranks it prunes must hold zero singular values."""
        if config.rank_pattern is None:
            return
        names = [name for name, _ in layers]
        unknown = [key for key in config.rank_pattern if key not in names]
        if unknown:
            raise ValueError(
                f"rank_pattern names {unknown[:3]}, which adapter {adapter_name!r} does not adapt (it adapts "
                f"{names[:3]}{' ...' if len(names) > 3 else ''}): the file contradicts itself (PEFT refuses it too). "
                "Export the adapter again from the model it was trained on."
            )
        for name in names:
            kept = config.rank_pattern.get(name)
            E = state.get(f"{name}.lora_E.{adapter_name}" if name else f"lora_E.{adapter_name}")
            if kept is None or E is None or E.numel() != len(kept):
                continue
            pruned = ~torch.tensor(kept, dtype=torch.bool)
            if E.detach().flatten().cpu()[pruned].ne(0).any():
                raise ValueError(
                    f"{name}: rank_pattern prunes ranks {pruned.nonzero().flatten().tolist()}, but the file's lora_E "
                    "holds non-zero singular values there, so they would compute: the file contradicts itself. "
                    "Save the adapter again from the model it was trained on."
                )

    def peft_config_fields(self, config: AdaLoraConfig) -> dict[str, Any]:
        fields = {
            _PEFT_NAMES.get(name, name): getattr(config, name)
            for name in (
                "init_r",
                "target_r",
                "alpha",
                "dropout",
                "tinit",
                "tfinal",
                "delta_t",
                "beta1",
                "beta2",
                "orth_reg_weight",
                "total_step",
            )
        }
        # PEFT refuses an AdaLoRA config without a positive total_step, even for inference.
        fields["total_step"] = config.total_step or max(config.tinit + config.tfinal + 1, 1)
        return {**fields, "bias": config.bias, "init_lora_weights": True}

    def config_from_peft(self, values: Mapping[str, Any], targeting: dict[str, Any]) -> AdaLoraConfig:
        if values.get("use_dora"):
            raise ValueError("use_dora=True is not an AdaLoRA option.")
        pattern = values.get("rank_pattern") or None
        if pattern is not None:
            pattern = {key.removesuffix(".lora_E"): kept for key, kept in pattern.items()}
        fields = {ours: values[peft] for ours, peft in _PEFT_NAMES.items() if values.get(peft) is not None}
        for name in ("init_r", "target_r", "tinit", "tfinal", "beta1", "beta2", "orth_reg_weight", "total_step"):
            if values.get(name) is not None:
                fields[name] = values[name]
        if values.get("bias") not in (None, "none"):
            fields["bias"] = "lora_only" if values["bias"] == "lora_only" else values["bias"]
        return AdaLoraConfig(**targeting, **fields, rank_pattern=pattern)


def surviving_ranks(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """Boolean ``[init_r]``: the ranks whose singular value is not zero (pruned ranks are exactly zero)."""
    return full_tensor(layer.lora_E[adapter_name].detach()).flatten().cpu() != 0


def _peft_kept(peft_config: Mapping[str, Any], layer_name: str) -> Optional[list[bool]]:
    pattern = peft_config.get("rank_pattern") or {}
    return pattern.get(f"{layer_name}.lora_E")

"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) and rsLoRA: ``result + scaling * B(A(dropout(x)))``.

``A: [r, in, *kernel]``, ``B: [out, r, *ones]``, ``scaling = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). How the
factors start is ``LoraConfig.init`` (:mod:`lightning_lora.core.inits.initializers`,
:mod:`lightning_lora.core.inits.svd_init`, :mod:`lightning_lora.core.inits.loftq`); SVD inits keep their initial factors
as frozen ``lora_init_A``/``lora_init_B``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from lightning_lora.core.common.base_weights import is_plain_weight
from lightning_lora.core.common.distributed import full_tensor
from lightning_lora.core.config.init_names import check_init_name
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.inits.initializers import (
    initializer_keeps_factors,
    initializer_needs_data,
    initializer_supports,
    resolve_initializer,
    weight_dependent_init,
)
from lightning_lora.core.inits.loftq import loftq_init  # noqa: F401  (registers the LoftQ inits)
from lightning_lora.core.inits.svd_init import (
    INIT_FACTOR_DICTS,
    adopt_init_factors,
    has_init_factors,
    restore_base_weight,
    svd_init_factors,
)
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor, rank_fits
from lightning_lora.core.kinds.nested_rank import nested_factors
from lightning_lora.core.layers.adapted_layer import restores
from lightning_lora.core.layers.layer_types import ConvAdapters, EmbeddingAdapters, layer_type_of
from lightning_lora.core.layers.parameter_adapters import ParameterAdapters

# Inits that work at any rank (random factors): an r beyond what a layer can use only warns, as PEFT allows it.
RANDOM_INITS = ("kaiming", "gaussian")

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer


class LoraKind(AdapterKind):
    """Low-rank factors ``A`` and ``B`` added to the base output."""

    name = "lora"
    display_name = "LoRA"
    peft_type = "LORA"
    containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_bias", *INIT_FACTOR_DICTS)
    config_class = LoraConfig
    lora_factors = True
    # eva_config and corda_config only steer data-driven inits, which a saved adapter's tensors have replaced (an
    # unconverted CorDA file, init_lora_weights="corda", is refused by its init).
    peft_fields = frozenset(
        {"lora_dropout", "bias", "use_rslora", "use_dora", "init_lora_weights", "fan_in_fan_out", "eva_config",
         "lora_bias", "trainable_token_indices", "corda_config", "target_parameters"}
    )
    peft_alpha_field = "lora_alpha"
    vllm_servable = True
    adapts_grouped_convolutions = True

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        shape_A, shape_B = layer.adapter_shapes(settings.r)
        embedding = isinstance(layer, EmbeddingAdapters)
        tensors = [
            AdapterTensor("lora_A", shape_A, "embedding" if embedding else "A"),
            AdapterTensor("lora_B", shape_B, "embedding" if embedding else "B"),
        ]
        if settings.config.lora_bias:
            tensors.append(AdapterTensor("lora_bias", shape_B[:1], "B"))  # a bias on B: LoRA+ groups it with B
        if initializer_keeps_factors(settings.config.init):
            frozen = zip(INIT_FACTOR_DICTS, (shape_A, shape_B))
            tensors += [AdapterTensor(name, shape, trainable=False) for name, shape in frozen]
        return tensors

    def check_mergeable(self, layer: LoraLayer, layer_name: str, adapter_name: str) -> None:
        if getattr(layer, "groups", 1) > 1:
            raise ValueError(
                f"{layer_name} is a grouped convolution (groups={layer.groups}): the {self.display_name} update of "
                f"{adapter_name!r} links every input channel to every output channel, which the grouped kernel cannot "
                "hold, so it cannot be merged (PEFT refuses too). Keep the adapter unmerged (save_adapter), or leave "
                "the layer out with exclude_modules."
            )

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)
        in_features, out_features, kernel = layer_type.lora_dims(module)
        init = settings.config.init
        usable = min(in_features * math.prod(kernel), out_features)
        groups = getattr(module, "groups", 1)
        if groups > 1 and (settings.r % groups or init not in RANDOM_INITS):
            raise ValueError(
                f"{layer_name} is a grouped convolution (groups={groups}): LoRA there needs a rank divisible by "
                f"{groups} (got r={settings.r}) and init in {RANDOM_INITS} (got {init!r}), as in PEFT. Set "
                f"rank_pattern={{{layer_name.split('.')[-1]!r}: {groups * max(1, settings.r // groups)}}}, or leave it "
                "out with exclude_modules."
            )
        if settings.r > usable and init in RANDOM_INITS:
            # As PEFT: B A still works, its rank is only capped (a PEFT adapter on a small head must load).
            fix = "Lower r" if isinstance(module, ParameterAdapters) else (
                f"Set rank_pattern={{{layer_name.split('.')[-1]!r}: {usable}}}")  # fmt: skip
            warnings.warn(
                f"Rank r={settings.r} on {layer_name} can use at most {usable} ranks; the other {settings.r - usable} "
                f"add parameters but nothing the update can express. {fix} to save them.",
                stacklevel=2,
            )
        else:
            rank_fits(layer_name, module, settings.r, usable)  # SVD inits and orthogonal rows need r <= usable
        if settings.config.lora_bias:
            if layer_type is EmbeddingAdapters:
                raise ValueError(
                    f"lora_bias=True does not apply to {layer_name} (nn.Embedding), as in PEFT: leave embeddings out "
                    "with exclude_modules, or train without lora_bias."
                )
            if getattr(module, "bias", None) is None:
                warnings.warn(
                    f"lora_bias=True on {layer_name}, which has no bias: the adapter trains, but it cannot be merged.",
                    stacklevel=2,
                )
        if not initializer_supports(init, layer_type):
            raise ValueError(
                f"init={init!r} is not defined for {layer_name} ({type(module).__name__}). Use init='kaiming' or "
                "leave such layers out with exclude_modules."
            )
        if weight_dependent_init(init) and not module.weight.is_meta and is_plain_weight(module):
            if not torch.isfinite(module.weight).all():
                raise ValueError(
                    f"init={init!r} reads the base weight of {layer_name}, which holds NaN/Inf: load the real weights "
                    "first, or use init='kaiming'."
                )

    def parameter_site_refusals(self, config: LoraConfig) -> list[str]:
        refused = {"use_dora": config.use_dora, "lora_bias": config.lora_bias,
                   f"init={config.init!r}": config.init not in ("kaiming", "gaussian")}  # fmt: skip
        return [option for option, bad in refused.items() if bad]

    def has_bias(self, config: LoraConfig) -> bool:
        return config.lora_bias

    def layer_dropout(self, config: LoraConfig) -> float:
        return config.dropout

    def scaling(self, settings: AdapterSettings) -> float:
        r = settings.r if settings.active_rank is None else settings.active_rank  # DyLoRA: a rank-b LoRA's scaling
        return settings.alpha / math.sqrt(r) if settings.config.use_rslora else settings.alpha / r

    def describe(self, settings: AdapterSettings) -> str:
        return f"r={settings.r}, alpha={settings.alpha:g}" + (", dora" if self.name == "dora" else "")

    def reads_base_weight(self, config: LoraConfig) -> bool:
        # Data-driven inits (CorDA, EVA) wait like weight-reading ones: for calibrate_adapters.
        return weight_dependent_init(config.init) or initializer_needs_data(config.init)

    def init_name(self, config: LoraConfig) -> Optional[str]:
        return config.init

    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        resolve_initializer(layer.lora_settings[adapter_name].config.init)(layer, adapter_name)
        if adapter_name in getattr(layer, "lora_bias", ()):
            layer.lora_bias[adapter_name].zero_()

    def prepare_load(
        self, layer: LoraLayer, adapter_name: str, state_dict: Mapping[str, torch.Tensor], prefix: str
    ) -> None:
        # Restored initial factors make the base weight their residual (no SVD is re-run), unless the same load
        # restores the base weight too (a full checkpoint holds the residual).
        if not has_init_factors(layer, adapter_name):
            return
        keys = [f"{prefix}{name}.{adapter_name}" for name in INIT_FACTOR_DICTS]
        targets = [getattr(layer, name)[adapter_name] for name in INIT_FACTOR_DICTS]
        if not all(key in state_dict and state_dict[key].shape == t.shape for key, t in zip(keys, targets)):
            return  # no factors to rebuild the residual from (or the load itself reports a shape error)
        weight_restored = restores(state_dict, f"{prefix}weight", layer.weight)
        init_A, init_B = (state_dict[key] for key in keys)
        adopt_init_factors(layer, adapter_name, init_A, init_B, base_weight_restored=weight_restored)

    def release_base(self, layer: LoraLayer, adapter_name: str) -> None:
        restore_base_weight(layer, adapter_name)

    def factors(self, layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``B`` as computed with: all ranks, or the first ``active_rank`` (DyLoRA's nested ranks)."""
        return _computed_factors(layer, adapter_name, layer.lora_settings[adapter_name])

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        settings = layer.lora_settings[adapter_name]
        lora_A, lora_B = _computed_factors(layer, adapter_name, settings)
        h = layer.adapter_input(x, settings.dropout, lora_A.dtype)
        if not settings.config.lora_bias:
            return layer.add_lora_output(result, h, lora_A, lora_B, settings.scaling)
        update = layer.lora_output(h, lora_A, lora_B, settings.scaling)
        update = update + layer.channel_view(layer.lora_bias[adapter_name] * settings.scaling)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's own layout and dtype."""
        settings = layer.lora_settings[adapter_name]
        delta = lora_factor_delta(layer, *_computed_factors(layer, adapter_name, settings), settings.scaling)
        return layer.to_weight_layout(delta)

    def plain_factors(self, settings: AdapterSettings) -> bool:
        return not self.has_bias(settings.config)

    def bias_delta(self, layer: LoraLayer, adapter_name: str) -> Optional[torch.Tensor]:
        """``scaling * b`` for a ``lora_bias`` adapter."""
        if adapter_name not in getattr(layer, "lora_bias", ()):
            return None
        return layer.lora_bias[adapter_name].detach() * layer.lora_settings[adapter_name].scaling

    # ----- PEFT -----
    def peft_tensor_leaf(self, layer: LoraLayer, container: str) -> str:
        if container == "lora_magnitude":
            return "lora_magnitude_vector"
        if container == "lora_bias":
            return "lora_B.bias"
        if isinstance(layer, EmbeddingAdapters):
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}[container]
        return f"{container}.weight"

    def peft_tensor_shape(self, layer: LoraLayer, container: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        # PEFT keeps conv DoRA magnitudes as [1, out, 1, ...] (the layout of its norm), all others as [out].
        if container == "lora_magnitude" and isinstance(layer, ConvAdapters):
            return (1, shape[0], *(1 for _ in layer.kernel_size))
        return shape

    def peft_export(self, layer: LoraLayer, adapter_name: str) -> tuple[dict[str, torch.Tensor], int, float]:
        tensors, r, alpha = super().peft_export(layer, adapter_name)
        rank = layer.lora_settings[adapter_name].active_rank
        if rank is not None:  # DyLoRA's nested rank: write the rank-b LoRA the layer computes
            tensors.update(lora_A=tensors["lora_A"][:rank], lora_B=tensors["lora_B"][:, :rank])
            r = rank
        factors = svd_init_factors(layer, adapter_name)
        if factors is not None:
            # W_orig = W_res + s B0 A0, so W_res + s B A = W_orig + s [B, -B0] [A; A0]: a plain LoRA of rank 2r with
            # the same scaling (alpha doubled, or times sqrt(2) under rsLoRA's alpha / sqrt(r)).
            A0, B0 = (full_tensor(t.detach()) for t in factors)
            tensors["lora_A"] = torch.cat([tensors["lora_A"], A0.to(tensors["lora_A"].dtype)], dim=0)
            tensors["lora_B"] = torch.cat([tensors["lora_B"], -B0.to(tensors["lora_B"].dtype)], dim=1)
            r *= 2
            alpha *= math.sqrt(2) if layer.lora_settings[adapter_name].config.use_rslora else 2.0
        return tensors, r, alpha

    def check_peft_export(self, adapter_name: str, config: LoraConfig, layers: list[tuple[str, LoraLayer]]) -> None:
        converted = [name for name, layer in layers if has_init_factors(layer, adapter_name)]
        if config.use_dora and converted:
            raise ValueError(
                f"Adapter {adapter_name!r} combines DoRA with init={config.init!r}: its base weights hold a residual "
                "and a DoRA adapter cannot be re-expressed against the original weights. Save it with "
                "format='lightning_lora', or export the merged model with save_merged_model."
            )
        missing = [name for name, _ in layers if name not in converted]
        if weight_dependent_init(config.init) and missing:
            raise ValueError(
                f"Adapter {adapter_name!r} was initialised with init={config.init!r}, which rewrote the base weights, "
                f"but {missing[:3]} keep no initial factors (layer.lora_init_A / lora_init_B), so no exact delta "
                "against the original weights exists. Save it with format='lightning_lora', or export the merged "
                "model."
            )

    def fold_for_vllm(
        self, tensors: dict[str, torch.Tensor], r: int, scaling: float, rank: int, new_scaling: float
    ) -> dict[str, torch.Tensor]:
        """Zero-pad to ``rank`` (exact) and fold ``scaling / new_scaling`` into B."""
        if "lora_bias" in tensors:
            raise ValueError(
                "A vLLM adapter holds only lora_A/lora_B: this adapter has a bias on B (lora_bias=True). Export with "
                "format='peft', or serve the merged model (save_merged_model)."
            )
        A, B = tensors["lora_A"], tensors["lora_B"]
        if scaling != new_scaling:
            B = B * (scaling / new_scaling)
        pad = rank - r
        if pad:
            A = torch.cat([A, A.new_zeros(pad, *A.shape[1:])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], pad, *B.shape[2:])], dim=1)
        return {"lora_A": A, "lora_B": B}

    def peft_config_fields(self, config: LoraConfig) -> dict[str, Any]:
        return {
            "lora_dropout": config.dropout,
            "bias": config.bias,
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "init_lora_weights": True,  # PEFT would otherwise re-run an SVD init at load and change the base
            "lora_bias": config.lora_bias,
        }

    def config_from_peft(self, values: Mapping[str, Any], targeting: dict[str, Any]) -> LoraConfig:
        return LoraConfig(
            **targeting,
            dropout=values.get("lora_dropout") or 0.0,
            bias=values.get("bias") or "none",
            use_rslora=bool(values.get("use_rslora")),
            use_dora=bool(values.get("use_dora")),
            init=_init_from_peft(values.get("init_lora_weights", True)),
            lora_bias=bool(values.get("lora_bias")),
            trainable_token_indices=values.get("trainable_token_indices"),
            target_parameters=values.get("target_parameters") or None,
        )


def lora_factor_delta(layer: LoraLayer, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` as a dense ``[out, in, *kernel]`` tensor (float32 for half-precision factors).

    Args:
        layer: The adapted layer (its geometry).
        lora_A: ``[r, in, *kernel]`` factor (whole, not sharded).
        lora_B: ``[out, r, *ones]`` factor (whole).
        scaling: The adapter's scaling.
    """
    compute_dtype = torch.float32 if lora_A.dtype in (torch.float16, torch.bfloat16) else lora_A.dtype
    return layer.low_rank_product(lora_A.to(compute_dtype), lora_B.to(compute_dtype)) * scaling


def _computed_factors(
    layer: LoraLayer, adapter_name: str, settings: AdapterSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` as computed with: all ranks, or the first ``active_rank`` (DyLoRA's nested ranks)."""
    lora_A, lora_B = _factor(layer, "lora_A", adapter_name), _factor(layer, "lora_B", adapter_name)
    return (lora_A, lora_B) if settings.active_rank is None else nested_factors(lora_A, lora_B, settings)


def _factor(layer: LoraLayer, container: str, adapter_name: str) -> torch.Tensor:
    # The per-call path reads the registered parameter directly (nn.Module and ParameterDict lookups cost more than
    # the rest of the Python around a small layer); a strategy that swapped in a plain tensor is read the usual way.
    parameters = layer._modules[container]._parameters
    return parameters[adapter_name] if adapter_name in parameters else getattr(layer, container)[adapter_name]


def _init_from_peft(init_lora_weights: Any) -> str:
    if init_lora_weights in (True, False, None, "eva"):
        # The adapter's trained values replace the initial ones (EVA leaves the base untouched: its file, with the
        # rank and alpha patterns its rank redistribution wrote, is a plain LoRA adapter).
        return "kaiming"
    try:
        if str(init_lora_weights).startswith("loftq"):
            # PEFT's LoftQ adapter belongs to the LoftQ-modified base PEFT saved with it (and ignores the scaling).
            raise ValueError("a PEFT LoftQ adapter needs the base model PEFT saved with it")
        check_init_name(str(init_lora_weights))
    except ValueError as err:
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is not supported by lightning_lora ({err}). Convert the adapter "
            "to a plain LoRA in PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        ) from None
    return str(init_lora_weights)

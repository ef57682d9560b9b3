"""What every adapter config shares: targeting (which modules), the low-rank fields of rank-``r`` kinds, and the
checks and PEFT pattern rules they use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from lightning_lora.core.config.fields import (
    ALL_LINEAR,
    BIAS_MODES,
    check_alpha,
    check_patterns,
    check_rank,
    check_regex,
    config_from_dict,
    pattern_key,
)
from lightning_lora.core.config.quantization_config import QuantizationConfig

TARGETING_ARGS = """
        target_modules: Which layers get adapters. A list of names: a module matches when its full name equals an
            entry or ends with ``"." + entry`` (``["q_proj", "v_proj"]``). A string: a regular expression that must
            match the full module name (``r".*\\.attn\\.(q|v)_proj"``). The string ``"all-linear"``: every linear
            layer (``nn.Linear``, Hugging Face ``Conv1D``) except the output head.
        exclude_modules: Layers never adapted, with the same list/regex rules as ``target_modules``.
        layers_to_transform: Adapt only these layer indices (the number in ``...layers.3.q_proj``).
        layers_pattern: Name of the container holding the numbered layers (``"layers"``, ``"h"``); default: the
            last ``<name>.<number>.`` part of the module path.
        bias: Which biases train with the adapter: ``"none"``, ``"all"`` (every bias of the model) or
            ``"lora_only"`` (biases of adapted layers). Trained biases are saved with the adapter.
        modules_to_save: Modules trained in full beside the adapters (a new classification head, say); same name
            rules as a ``target_modules`` list. Their weights are saved with the adapter."""

LOW_RANK_ARGS = """
        r: Rank of the update (LoRA: the inner dimension of ``B @ A``; each kind says what its factors share). At
            least 1; checked against every adapted layer at injection.
        alpha: Scale numerator: the update is multiplied by ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Must be > 0.
        rank_pattern: Per-layer rank overrides, ``{pattern: r}``; a pattern matches a module name or a dotted suffix
            of it (regex allowed, e.g. ``{"layers\\.0\\..*": 4}``). First matching entry wins.
        alpha_pattern: Per-layer alpha overrides, same rules as ``rank_pattern``."""


@dataclass(kw_only=True)
class AdapterConfig:
    """What every adapter kind shares: which layers it adapts and what trains beside it.

    Each kind has a config class built on this one (:class:`LoraConfig`, ``LoHaConfig``, ``LoKrConfig``,
    ``OFTConfig``, ...); the class chosen is the kind. Every field is checked when the config is built.

    Args:""" + TARGETING_ARGS + """
    """

    #: Fields a training-time schedule fills in (AdaLoRA's final ``rank_pattern``): a resumed run's config need not
    #: have them, and they are not compared with a checkpoint's.
    filled_in_training: ClassVar[tuple[str, ...]] = ()

    target_modules: Union[list[str], str] = ALL_LINEAR
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[list[int]] = None
    layers_pattern: Optional[str] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules and not getattr(self, "target_parameters", None):
                raise ValueError("target_modules is empty; name the layers to adapt, e.g. ['q_proj', 'v_proj'].")
        check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            check_patterns("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            if (
                not isinstance(self.layers_to_transform, (list, tuple))
                or not self.layers_to_transform
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers_to_transform)
            ):
                raise ValueError(
                    f"layers_to_transform must be a non-empty list of layer indices >= 0, "
                    f"got {self.layers_to_transform!r}."
                )
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ValueError(
                    f"modules_to_save must be a list of module names (e.g. ['classifier']) or None, got "
                    f"{self.modules_to_save!r} ({type(self.modules_to_save).__name__})."
                )
            self.modules_to_save = list(self.modules_to_save)

    @property
    def kind(self) -> str:
        """Name of the adapter kind in ``lightning_lora.core.kinds.KINDS`` that this config creates."""
        raise NotImplementedError(f"{type(self).__name__} names no adapter kind; use a kind's config class.")

    @property
    def quantization(self) -> Optional[QuantizationConfig]:
        """Kinds without a ``quantization`` field never quantise the base."""
        return None

    @property
    def target_parameters(self) -> Optional[list[str]]:
        """Kinds without a ``target_parameters`` field adapt modules only."""
        return None

    def rank_for(self, module_name: str) -> int:
        """The kind's rank-like size on ``module_name`` (LoRA's rank; 0 where the kind derives it per layer)."""
        return 0

    def alpha_for(self, module_name: str) -> float:
        """The kind's scale numerator on ``module_name``; 1 for kinds without one."""
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        return config_from_dict(cls, values, cls.__name__)


@dataclass(kw_only=True)
class LowRankConfig(AdapterConfig):
    """The fields of kinds built from rank-``r`` factors scaled by ``alpha / r`` (LoRA, LoHa, LoKr).

    Args:""" + LOW_RANK_ARGS + TARGETING_ARGS + """
    """

    r: int = 8
    alpha: float = 16.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        check_alpha("alpha", self.alpha)
        self.alpha = float(self.alpha)
        for key, value in self.rank_pattern.items():
            check_regex("rank_pattern", key)
            check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_regex("alpha_pattern", key)
            check_alpha(f"alpha_pattern[{key!r}]", value)

    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` after ``rank_pattern``."""
        return self.rank_pattern[key] if (key := pattern_key(self.rank_pattern, module_name)) else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha of the adapter on ``module_name`` after ``alpha_pattern``."""
        return float(self.alpha_pattern[key]) if (key := pattern_key(self.alpha_pattern, module_name)) else self.alpha

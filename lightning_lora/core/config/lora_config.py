"""``LoraConfig``: what to adapt and how, validated when it is built."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from lightning_lora.core.common.checks import is_finite_number, is_integer
from lightning_lora.core.config.init_names import check_init_name, is_data_init

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class QuantizationConfig:
    """How :func:`~lightning_lora.apply_lora` quantises the frozen base with bitsandbytes (QLoRA).

    Adapters always stay in full precision on top of the quantised base.

    Args:
        bits: ``4`` (blockwise NF4/FP4, as in QLoRA) or ``8`` (row-wise LLM.int8()).
        quant_type: 4-bit data type: ``"nf4"`` (normal float, QLoRA's choice) or ``"fp4"``.
        double_quant: 4-bit only: quantise the per-block scales too (about 0.4 bit per weight less).
        compute_dtype: 4-bit only: dtype of the base layer's matmul, ``"float32"``, ``"bfloat16"`` or
            ``"float16"``; inputs are cast to it and outputs back to the input dtype.
        int8_threshold: 8-bit only: LLM.int8() outlier threshold for inputs (bitsandbytes' default 6.0; 0 turns
            outlier handling off).
        layers: Which layers to quantise: ``"targets"`` (the ``nn.Linear`` layers that get adapters) or
            ``"all-linear"`` (every ``nn.Linear`` except the output head and ``modules_to_save``). Other layer kinds
            (embeddings, convolutions, Hugging Face ``Conv1D``) stay in full precision.
        storage_dtype: 4-bit only: the dtype the packed 4-bit bytes are stored as (bitsandbytes' ``quant_storage``).
            ``"uint8"`` shards under FSDP2 with any mixed precision; FSDP1 and DeepSpeed ZeRO-3 flatten a unit's
            parameters into one tensor of one dtype, so they need the dtype of the model's other parameters.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    int8_threshold: float = 6.0
    layers: Literal["targets", "all-linear"] = "targets"
    storage_dtype: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"

    def __post_init__(self) -> None:
        choices = {
            "bits": (4, 8),
            "quant_type": ("nf4", "fp4"),
            "compute_dtype": ("float32", "bfloat16", "float16"),
            "layers": ("targets", ALL_LINEAR),
            "storage_dtype": ("uint8", "float32", "bfloat16", "float16"),
        }
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid or isinstance(value, bool):
                raise ValueError(f"quantization.{name} must be one of {valid}, got {value!r}.")
        if not (is_finite_number(self.int8_threshold) and self.int8_threshold >= 0):
            raise ValueError(
                f"quantization.int8_threshold must be a finite number >= 0, got {self.int8_threshold!r}; "
                "bitsandbytes' default is 6.0, and 0 turns outlier handling off."
            )
        self.int8_threshold = float(self.int8_threshold)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantizationConfig:
        """Build from a plain dict; unknown keys are an error naming them."""
        return _from_dict(cls, values, "QuantizationConfig")


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
        _check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_patterns("exclude_modules", self.exclude_modules)
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
        return _from_dict(cls, values, cls.__name__)


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
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        self.alpha = float(self.alpha)
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)

    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` after ``rank_pattern``."""
        return self.rank_pattern[key] if (key := _pattern_key(self.rank_pattern, module_name)) else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha of the adapter on ``module_name`` after ``alpha_pattern``."""
        return float(self.alpha_pattern[key]) if (key := _pattern_key(self.alpha_pattern, module_name)) else self.alpha


@dataclass
class EvaConfig:
    """How ``LoraConfig(init="eva")`` (Paischer et al. 2024, https://arxiv.org/abs/2410.07170) reads its
    calibration batches; the fields and defaults of PEFT's ``EvaConfig``.

    Args:
        rho: Rank redistribution: a layer may get up to ``round(r * rho)`` ranks (at least 1.0; 1.0 keeps every
            layer at its own rank). The total stays the sum of the configured ranks.
        tau: Convergence threshold: a layer's incremental SVD stops once the cosine similarity of its components
            between two batches is at least ``tau`` (in ``[0, 1]``).
        use_label_mask: For batches with ``labels``, leave out positions whose label is ``label_mask_value``.
        label_mask_value: The label of positions left out.
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: Scale a layer's alpha with its new rank (``alpha * new_r / r``), so every layer keeps
            its scaling.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not (is_finite_number(self.rho) and self.rho >= 1.0):
            raise ValueError(
                f"eva_config.rho must be a finite number >= 1.0 (1.0: no rank redistribution; PEFT's default 2.0), "
                f"got {self.rho!r}."
            )
        if not (is_finite_number(self.tau) and 0.0 <= self.tau <= 1.0):
            raise ValueError(f"eva_config.tau must be in [0, 1] (PEFT's default 0.99), got {self.tau!r}.")
        if not is_integer(self.label_mask_value):
            raise ValueError(
                f"eva_config.label_mask_value must be an integer label (PEFT's default -100), got "
                f"{self.label_mask_value!r}."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvaConfig:
        """Build from a plain dict; unknown keys are an error naming them."""
        return _from_dict(cls, values, "EvaConfig")


@dataclass(kw_only=True)
class LoraConfig(LowRankConfig):
    __doc__ = """Configuration of one LoRA adapter (and its variants rsLoRA and DoRA, and its initialisations).

    ``x -> W x + scaling * B A dropout(x)`` with ``A: [r, in]``, ``B: [out, r]``. Every field is checked when the
    config is built, so a mistake fails before any model is touched.

    Args:""" + LOW_RANK_ARGS + TARGETING_ARGS + """
        dropout: Dropout probability applied to the adapter's input, in ``[0, 1)``.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: Weight-decomposed LoRA: a trainable magnitude per output unit rescales ``W + scaling * B @ A``.
        init: How adapters start. ``"kaiming"`` (A Kaiming-uniform, B zero; for embeddings A zero, B normal),
            ``"gaussian"`` (A normal with std ``1/r``, B zero), ``"orthogonal"`` (A and B from orthogonal halves, so
            ``B @ A = 0``; needs an even rank), or an SVD method registered in
            ``lightning_lora.core.inits.initializers`` (``"pissa"``, ``"pissa_niter_<K>"``, ``"milora"``, ``"olora"``).
            Every method leaves the model's outputs unchanged at init, except ``"loftq"`` / ``"loftq_iter_<K>"`` (needs
            ``quantization``): LoftQ chooses the quantised base and the adapter together so that their sum is closer to
            the full-precision weight than the quantised base alone (1 or K alternations of quantisation and SVD).
            Data-driven: ``"corda_ipm"`` / ``"corda_kpm"`` (CorDA's instruction-previewed / knowledge-preserving modes)
            and ``"eva"`` read calibration batches; the adapter stays pending until
            :func:`~lightning_lora.calibrate_adapters` (or ``LoraCallback(calibration_batches=N)``) runs.
        quantization: Quantise the frozen base with bitsandbytes at injection (QLoRA), see
            :class:`QuantizationConfig`; None (default) leaves the base as it is (it may already be quantised).
        lora_bias: A trainable bias on ``B`` (PEFT's ``lora_bias``), starting at zero: the update becomes
            ``scaling * (B A x + b)``. Meant for adapters extracted from fully fine-tuned weights, whose bias moved
            too. Not with DoRA or on embeddings; only with ``init="kaiming"`` or ``"gaussian"``; merging needs a
            base layer with a bias, which absorbs ``scaling * b``.
        trainable_token_indices: Embedding rows that train too, e.g. new special tokens (PEFT's option of the same
            name): a list of token ids for the input embedding, or ``{embedding name: ids}``. Only those rows
            train; they are saved with the adapter and merge into the table. An ``nn.Linear`` output head tied to
            the table uses the new rows too, as in PEFT.
        target_parameters: Parameters adapted directly rather than through their layer (PEFT's option of the same
            name): ``"<module>.<parameter>"`` suffixes such as ``"experts.gate_up_proj"``. A 3-D parameter
            ``[experts, out, in]`` (fused mixture-of-experts weights) gets one rank-``r`` update per expert. With
            ``target_modules=[]`` only the parameters are adapted. No dropout, ``lora_bias``, DoRA or SVD init.
        eva_config: Options of ``init="eva"`` (:class:`EvaConfig`; default ``EvaConfig()``).
    """

    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    quantization: Optional[QuantizationConfig] = None
    lora_bias: bool = False
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    target_parameters: Optional[list[str]] = None
    eva_config: Optional[EvaConfig] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout("dropout", self.dropout)
        self.dropout = float(self.dropout)
        check_init_name(self.init)
        if self.init == "orthogonal" and any(r % 2 for r in [self.r, *self.rank_pattern.values()]):
            raise ValueError("init='orthogonal' needs an even rank; choose an even r (and rank_pattern values).")
        if isinstance(self.quantization, dict):
            self.quantization = QuantizationConfig.from_dict(self.quantization)
        if self.quantization is not None and not isinstance(self.quantization, QuantizationConfig):
            raise TypeError(
                f"quantization must be a QuantizationConfig, a dict of its fields or None, got {self.quantization!r}."
            )
        self.trainable_token_indices = _checked_token_indices(self.trainable_token_indices)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not (
                isinstance(self.target_parameters, (list, tuple))
                and all(isinstance(p, str) and p for p in self.target_parameters)
            ):
                raise ValueError(f"target_parameters must be a list of parameter names (e.g. ['experts.down_proj']), "
                                 f"got {self.target_parameters!r}.")  # fmt: skip
            self.target_parameters = list(self.target_parameters) or None
        if not isinstance(self.lora_bias, bool):
            raise TypeError(f"lora_bias must be True or False, got {self.lora_bias!r}.")
        if self.lora_bias and (self.use_dora or self.init not in ("kaiming", "gaussian")):
            raise ValueError(
                f"lora_bias=True works with plain LoRA initialised with init='kaiming' or 'gaussian' (as in PEFT), "
                f"not with {'use_dora=True' if self.use_dora else f'init={self.init!r}'}; drop one of the two."
            )
        if re.fullmatch(r"loftq_iter_0+", self.init):
            raise ValueError(f"init={self.init!r}: LoftQ needs at least one iteration, e.g. 'loftq_iter_2'.")
        if self.init.startswith("loftq") and self.quantization is None:
            raise ValueError(
                f"init={self.init!r} initialises adapters for a quantised base; set quantization, e.g. "
                "LoraConfig(init='loftq', quantization=QuantizationConfig(bits=4)), on a full-precision model."
            )
        self._check_data_init()

    def _check_data_init(self) -> None:
        if isinstance(self.eva_config, dict):
            self.eva_config = EvaConfig.from_dict(self.eva_config)
        if self.eva_config is not None and not isinstance(self.eva_config, EvaConfig):
            raise TypeError(f"eva_config must be an EvaConfig, a dict of its fields or None, got {self.eva_config!r}.")
        if is_data_init(self.init) and self.quantization is not None:
            raise ValueError(
                f"init={self.init!r} runs on calibration batches after injection, when the base would already be "
                "quantised. Calibrate the full-precision model and quantise afterwards, or drop quantization."
            )

    @property
    def kind(self) -> str:
        """``"dora"`` with ``use_dora``, else ``"lora"``."""
        return "dora" if self.use_dora else "lora"


def _checked_token_indices(value: Any) -> Optional[Union[list[int], dict[str, list[int]]]]:
    """``trainable_token_indices`` checked: a non-empty list of distinct token ids >= 0, or a dict of embedding
    names to such lists."""

    def checked(indices: Any, where: str) -> list[int]:
        if (
            not isinstance(indices, (list, tuple))
            or not indices
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices)
            or len(set(indices)) != len(indices)
        ):
            raise ValueError(f"trainable_token_indices{where} must be a non-empty list of distinct token ids >= 0, "
                             f"got {indices!r}.")  # fmt: skip
        return list(indices)

    if value is None:
        return None
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ValueError(f"trainable_token_indices as a dict maps embedding names to token ids, got {value!r}.")
        return {name: checked(indices, f"[{name!r}]") for name, indices in value.items()}
    return checked(value, "")


def _from_dict(cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {name} fields {unknown}; valid fields are {sorted(known)}.")
    return cls(**values)


def pattern_matches(module_name: str, key: str) -> bool:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern`` keys: the key (a regex) matches a dotted suffix of the
    module name (``peft.utils.other.get_pattern_key``)."""
    try:
        return re.match(rf"(.*\.)?({key})$", module_name) is not None
    except re.error:
        return False


def _pattern_key(patterns: dict[str, Any], module_name: str) -> Optional[str]:
    return next((key for key in patterns if pattern_matches(module_name, key)), None)


def check_dropout(name: str, value: Any) -> None:
    """Raise a ValueError unless ``value`` is a probability in ``[0, 1)``."""
    if not (is_finite_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}; use 0.0 to switch dropout off.")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _check_alpha(name: str, value: Any) -> None:
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}; a common choice is alpha = 2 * r.")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {err}.") from err


def _check_patterns(name: str, patterns: Union[list[str], str]) -> None:
    if isinstance(patterns, str):
        if patterns != ALL_LINEAR:
            _check_regex(name, patterns)
        return
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must be a list of non-empty module names or one regex string, got {patterns!r}.")

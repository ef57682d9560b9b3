"""``LoraConfig``: what to adapt and how, validated when it is built; EVA's options."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning_lora.core.common.checks import is_finite_number, is_integer
from lightning_lora.core.config.adapter_config import LOW_RANK_ARGS, TARGETING_ARGS, LowRankConfig
from lightning_lora.core.config.fields import check_dropout, config_from_dict
from lightning_lora.core.config.init_names import check_init_name, is_data_init
from lightning_lora.core.config.quantization_config import QuantizationConfig


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
        return config_from_dict(cls, values, "EvaConfig")


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



"""VB-LoRA: LoRA factors mixed from one shared vector bank (Li et al. 2024, https://arxiv.org/abs/2405.15179).

Every adapted layer cuts its ``A: [r, in]`` and ``B: [out, r]`` into sub-vectors of ``vector_length`` numbers, and
each sub-vector is a mixture of ``topk`` vectors of one bank ``[num_vectors, vector_length]`` that all the layers of
the adapter share and train: per sub-vector a row of logits over the bank, of which the ``topk`` largest are
softmax-weighted (PEFT's ``VBLoRAConfig``, computed as PEFT does). The layer keeps only its logits
(``vblora_logits_A: [r, in / L, num_vectors]``, ``vblora_logits_B: [out / L, r, num_vectors]``); the bank is one
``nn.Parameter`` held by the module containing all the adapted layers (``vblora_vector_bank.<adapter>``), once in
memory, optimizers, state dicts, checkpoints and files (PEFT's key ``base_model.vblora_vector_bank``).

``save_only_topk_weights``: PEFT files then hold, per logits row, the indices of the ``topk`` largest logits and the
first ``topk - 1`` softmax weights, which fix the outputs but not the logits. Native files always hold the whole
logits (resume is exact). A PEFT top-k file loads for inference and merging, exactly: the other logits become
:data:`TOPK_ONLY_LOGIT`, below every kept one; training such an adapter is refused by name at its first forward with
gradients (the logits PEFT left out cannot be recovered), as PEFT refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.common.checks import is_finite_number, is_integer
from lightning_lora.core.common.distributed import is_dtensor
from lightning_lora.core.config.adapter_config import TARGETING_ARGS, AdapterConfig
from lightning_lora.core.config.fields import check_dropout
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor, refuse_meta_targets
from lightning_lora.core.layers.layer_types import LinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

#: The logits a PEFT top-k file leaves out (``save_only_topk_weights``), as loaded: far below any kept log-weight
#: (at least ``log(float32 tiny)``, about -87), finite in every float dtype (PEFT uses -inf, which loads refuse).
TOPK_ONLY_LOGIT = -1e4
_LOGITS = ("vblora_logits_A", "vblora_logits_B")


@dataclass(kw_only=True)
class VBLoRAConfig(AdapterConfig):
    __doc__ = """Configuration of one VB-LoRA adapter (PEFT's ``VBLoRAConfig``).

    Adapts ``nn.Linear`` and Hugging Face ``Conv1D``. Unlike LoRA it does not start at the identity: its factors are
    mixtures of a random bank from the start (as in the paper and PEFT).

    Args:
        r: Rank of the update ``B @ A`` (PEFT's default 4).
        num_vectors: Vectors in the shared bank (more for larger models).
        vector_length: Length of each bank vector; must divide the input and output features of every adapted
            layer.
        topk: Bank vectors mixed into each sub-vector (the paper's best: 2), at most ``num_vectors``.""" + (
        TARGETING_ARGS
    ) + """
        vblora_dropout: Dropout on the adapter's input, in ``[0, 1)``.
        init_vector_bank_bound: The bank starts uniform in ``[-bound, bound]``; > 0 (a zero bank gives zero gradients
            for ever).
        init_logits_std: Standard deviation of the normal initial logits, >= 0.
        save_only_topk_weights: Write PEFT files with only the top-k weights and indices of the logits (smaller;
            PEFT and lightning_lora load them for inference and merging only). Native files keep the whole logits.
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    vblora_dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    save_only_topk_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.topk > self.num_vectors:
            raise ValueError(
                f"topk={self.topk} exceeds num_vectors={self.num_vectors}: each sub-vector mixes topk of the bank's "
                "vectors. Lower topk (2 works best in the paper) or enlarge the bank."
            )
        check_dropout("vblora_dropout", self.vblora_dropout)
        if not (is_finite_number(self.init_vector_bank_bound) and self.init_vector_bank_bound > 0):
            raise ValueError(
                f"init_vector_bank_bound must be a finite number > 0, got {self.init_vector_bank_bound!r}: a zero bank "
                "makes every factor zero and every gradient zero, so the adapter never trains. PEFT's default is 0.02."
            )
        if not (is_finite_number(self.init_logits_std) and self.init_logits_std >= 0):
            raise ValueError(f"init_logits_std must be a finite number >= 0, got {self.init_logits_std!r} (PEFT: 0.1).")
        if not isinstance(self.save_only_topk_weights, bool):
            raise ValueError(f"save_only_topk_weights must be True or False, got {self.save_only_topk_weights!r}.")

    @property
    def kind(self) -> str:
        return "vblora"

    def rank_for(self, module_name: str) -> int:
        return self.r


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``[..., vector_length]``: per row of ``logits`` (``[..., num_vectors]``), the softmax-weighted sum of the bank
    vectors of its ``topk`` largest logits (PEFT's ``_get_low_rank_matrix``)."""
    top_logits, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top_logits, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


class VBLoRAKind(AdapterKind):
    """Per layer ``vblora_logits_A`` and ``vblora_logits_B``; shared and trained ``vblora_vector_bank``."""

    name = "vblora"
    display_name = "VB-LoRA"
    peft_type = "VBLORA"
    containers: ClassVar[tuple[str, ...]] = (*_LOGITS, "vblora_vector_bank")
    config_class = VBLoRAConfig
    peft_alpha_field = None
    peft_bias_only = "vblora_only"
    peft_fields = frozenset({
        "r", "num_vectors", "vector_length", "topk", "vblora_dropout", "init_vector_bank_bound", "init_logits_std",
        "save_only_topk_weights", "bias", "fan_in_fan_out",
    })
    trains_shared = True

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        config: VBLoRAConfig = settings.config
        in_features, out_features, _ = layer.lora_dims()
        length, count = config.vector_length, config.num_vectors
        return [
            AdapterTensor("vblora_logits_A", (settings.r, in_features // length, count)),
            AdapterTensor("vblora_logits_B", (out_features // length, settings.r, count)),
        ]

    def shared_tensors(self, config: VBLoRAConfig, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
        refuse_meta_targets(self, "shared vector bank", targets)
        weight = targets[0][1].weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        bank = torch.empty(config.num_vectors, config.vector_length, device=weight.device, dtype=dtype)
        return {"vblora_vector_bank": bank.uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)}

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)
        if layer_type is None or not issubclass(layer_type, LinearAdapters):
            raise ValueError(
                f"A VB-LoRA adapter cannot go on {layer_name} ({type(module).__name__}): VB-LoRA adapts nn.Linear and "
                "Hugging Face Conv1D (as PEFT). Leave it out with exclude_modules, or use LoraConfig for it."
            )
        in_features, out_features, _ = layer_type.lora_dims(module)
        length = settings.config.vector_length
        if in_features % length or out_features % length:
            fitting = [d for d in range(1, min(in_features, out_features) + 1)
                       if not in_features % d and not out_features % d]  # fmt: skip
            raise ValueError(
                f"vector_length={length} does not divide the {in_features} input and {out_features} output features "
                f"of {layer_name} ({type(module).__name__}): VB-LoRA cuts both into bank vectors. Use a vector_length "
                f"that divides every adapted layer's features (here {fitting[-4:]}), or leave {layer_name} out with "
                "exclude_modules."
            )

    def layer_dropout(self, config: VBLoRAConfig) -> float:
        return config.vblora_dropout

    def scaling(self, settings: AdapterSettings) -> float:
        return 1.0  # the bank and the weights carry the scale

    def describe(self, settings: AdapterSettings) -> str:
        config: VBLoRAConfig = settings.config
        return f"vblora, r={settings.r}, topk={config.topk}, bank={config.num_vectors}x{config.vector_length}"

    @torch.no_grad()
    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        std = layer.lora_settings[adapter_name].config.init_logits_std
        for container in _LOGITS:
            getattr(layer, container)[adapter_name].normal_(0.0, std)

    def _factors(self, layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` mixed from the bank, as PEFT's ``_get_lora_matrices``."""
        logits_A, logits_B = (getattr(layer, container)[adapter_name] for container in _LOGITS)
        bank = layer.vblora_vector_bank[adapter_name]
        if is_dtensor(bank):
            raise ValueError(
                "VB-LoRA's vector bank is still sharded while an adapted layer computes: FSDP2 (fully_shard) gathers "
                "it with the module holding it, the one containing every adapted layer. Apply fully_shard to that "
                "module (or the root) and to modules inside it, not to a module holding only part of the adapted "
                "layers with the bank."
            )
        topk = layer.lora_settings[adapter_name].config.topk
        A = mix(logits_A, bank, topk).reshape(logits_A.shape[0], -1)
        B = mix(logits_B, bank, topk).transpose(1, 2).reshape(-1, logits_B.shape[1])
        return A, B

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        logits_A = layer.vblora_logits_A[adapter_name]
        if torch.is_grad_enabled() and logits_A.requires_grad and bool((logits_A[0, 0] <= TOPK_ONLY_LOGIT / 2).any()):
            raise RuntimeError(  # one look at one row per training step, as PEFT
                f"VB-LoRA adapter {adapter_name!r} was loaded from a PEFT file saved with save_only_topk_weights=True, "
                "which keeps only the top-k weights of its logits: it serves inference and merging, not training. "
                "Train from a file saved with save_only_topk_weights=False (or a native file), or freeze it."
            )
        A, B = self._factors(layer, adapter_name)
        h = layer.adapter_input(x, layer.lora_settings[adapter_name].dropout, A.dtype)
        update = F.linear(F.linear(h, A), B)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``B @ A`` in the base weight's layout."""
        A, B = self._factors(layer, adapter_name)
        return layer.to_weight_layout(B @ A)

    # ----- PEFT format -----
    def peft_config_fields(self, config: VBLoRAConfig) -> dict[str, Any]:
        fields = ("r", "num_vectors", "vector_length", "topk", "vblora_dropout", "init_vector_bank_bound",
                  "init_logits_std", "save_only_topk_weights")  # fmt: skip
        return {**{name: getattr(config, name) for name in fields}, "bias": self.peft_bias(config)}

    def peft_save_tensors(self, config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``save_only_topk_weights``: each logits tensor as PEFT's ``<key>_topk_indices`` (the smallest integer
        type that holds ``num_vectors``) and ``<key>_topk_weights`` (the first ``topk - 1`` softmax weights, in
        float32 whatever the adapter's dtype: PEFT 0.21 scatters them into a float32 tensor)."""
        if not config.save_only_topk_weights:
            return tensors
        bounds = ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31), (torch.int64, None))
        index_dtype = next(dtype for dtype, bound in bounds if bound is None or config.num_vectors < bound)
        written = {}
        for key, value in tensors.items():
            if key.endswith(_LOGITS):
                logits, indices = value.topk(config.topk)
                written[f"{key}_topk_indices"] = indices.to(index_dtype)
                weights = torch.softmax(logits.float(), dim=-1)[..., :-1]  # PEFT 0.21 reads float32 weights only
                written[f"{key}_topk_weights"] = weights.contiguous()
            else:
                written[key] = value
        return written

    def peft_load_tensors(self, config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``save_only_topk_weights``: logits rebuilt from the top-k indices and weights (the last weight is one
        minus the others, as PEFT), :data:`TOPK_ONLY_LOGIT` elsewhere; the outputs are the saved model's."""
        if not config.save_only_topk_weights:
            return tensors
        for key in [key for key in tensors if key.endswith("_topk_indices")]:
            logits_key = key.removesuffix("_topk_indices")
            indices, weights = tensors.pop(key).long(), tensors.pop(f"{logits_key}_topk_weights", None)
            if weights is None or indices.shape[-1] != config.topk or weights.shape != (*indices.shape[:-1],
                                                                                        config.topk - 1):
                found = None if weights is None else tuple(weights.shape)
                raise ValueError(
                    f"{key} {tuple(indices.shape)} and its _topk_weights {found} are not the top-{config.topk} indices "
                    f"and {config.topk - 1} weights per row that save_only_topk_weights writes: the file is damaged."
                )
            if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < config.num_vectors):
                raise ValueError(f"{key} holds bank indices outside [0, {config.num_vectors}): the file is damaged.")
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
            log_weights = weights.clamp_min(torch.finfo(weights.dtype).tiny).log()  # 0 (PEFT: -inf) stays finite
            filled = torch.full((*weights.shape[:-1], config.num_vectors), TOPK_ONLY_LOGIT, dtype=weights.dtype)
            tensors[logits_key] = filled.scatter(-1, indices, log_weights)
        return tensors

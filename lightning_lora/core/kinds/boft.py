"""BOFT: orthogonal finetuning by butterfly factorization (Liu et al. 2024, https://arxiv.org/abs/2311.06243).

The rotation ``M = M_{m-1} ... M_1 M_0`` is a product of ``m = boft_n_butterfly_factor`` sparse orthogonal factors
``M_i = P_i B_i P_i^T``: ``B_i`` is block-diagonal (``boft_block_num`` blocks of ``boft_block_size``), each block the
exact Cayley transform ``(I - Q)(I + Q)^-1`` of the skew part ``Q = (R - R^T) / 2`` of its ``boft_R`` entry, and
``P_i`` is the butterfly permutation that, within every run of ``boft_block_size * 2**i`` features, puts the even
half-blocks before the odd ones (``P_0`` is the identity, so one factor is OFT's block-diagonal rotation). A trained
scale ``boft_s`` per output follows: ``y = s * (W (M^T x)) + b``, so the merged weight is ``diag(s) W M^T`` (``W``
viewed as ``[out, in * kernel]``). Tensors (``boft_R: [m, blocks, bs, bs]``, ``boft_s``) and numbers are PEFT's.

Linear layers rotate the input through the factors (no dense ``M`` is built); convolutions run once with the rotated,
scaled kernel and the base's own stride, padding and dilation. PEFT 0.21 builds factors beyond the first only
through its CUDA extension (``fbd_cuda``): without it, it silently trains with one factor while its config still says
more. Here every factor count works on any device, and such a PEFT file is refused with the fix named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from lightning_lora.core.common.checks import is_integer
from lightning_lora.core.config.adapter_config import TARGETING_ARGS, AdapterConfig
from lightning_lora.core.config.fields import check_dropout
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor
from lightning_lora.core.kinds.oft import OFTKind, cayley, check_one_rotation, multiplicative_dropout
from lightning_lora.core.layers.layer_types import ConvAdapters, LinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

BOFT_LAYERS = "nn.Linear and nn.Conv2d (not grouped)"


@dataclass(kw_only=True)
class BOFTConfig(AdapterConfig):
    __doc__ = """Configuration of one BOFT adapter (PEFT's ``BOFTConfig``).

    Adapts ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``). Give exactly one of ``boft_block_size`` and
    ``boft_block_num``; the other is derived per layer (their product is the rotated size: ``in_features``, or
    ``in_channels * kernel`` of a convolution) and must fit it.

    Args:
        boft_block_size: Size of each rotation block, or 0 to use ``boft_block_num``. With more than one butterfly
            factor it must be even and ``boft_block_size * 2**(boft_n_butterfly_factor - 1)`` must divide the
            rotated size.
        boft_block_num: Number of blocks per layer, or 0 to use ``boft_block_size``. With more than one butterfly
            factor it must be a multiple of ``2**(boft_n_butterfly_factor - 1)``, and the blocks even-sized.
        boft_n_butterfly_factor: Number of butterfly factors (1: OFT's single block-diagonal rotation; each further
            factor mixes blocks twice as far apart).""" + TARGETING_ARGS + """
        boft_dropout: In training, replace this share of the blocks of one randomly chosen factor by the identity
            (multiplicative dropout, as PEFT).
        init_weights: True: every rotation starts as the identity and every scale at 1; False: random (for tests).
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            fix = "set the other to 0" if self.boft_block_size else "set one (PEFT's default: boft_block_size=4)"
            raise ValueError(
                "Give exactly one of boft_block_size (size of a block) and boft_block_num (blocks per layer), got "
                f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}; {fix}."
            )
        factor = self.boft_n_butterfly_factor
        if not is_integer(factor) or factor < 1:
            raise ValueError(f"boft_n_butterfly_factor must be an integer >= 1 (1: no butterfly), got {factor!r}.")
        spread = 2 ** (factor - 1)
        if factor > 1 and self.boft_block_size % 2:
            raise ValueError(
                f"boft_block_size={self.boft_block_size} is odd, but butterfly factors (boft_n_butterfly_factor="
                f"{factor}) exchange half-blocks; use an even block size, or boft_n_butterfly_factor=1."
            )
        if factor > 1 and self.boft_block_num % spread:
            raise ValueError(
                f"boft_block_num={self.boft_block_num} is not a multiple of 2**(boft_n_butterfly_factor - 1) = "
                f"{spread}, which {factor} butterfly factors need; use a multiple of {spread}, or fewer factors."
            )
        check_dropout("boft_dropout", self.boft_dropout)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}.")

    @property
    def kind(self) -> str:
        return "boft"


class BOFTKind(AdapterKind):
    """``boft_R``: one ``[bs, bs]`` generator per block of each butterfly factor; ``boft_s``: a scale per output
    (``[out, 1]`` on linear layers, ``[1, out]`` on convolutions, as PEFT keeps them)."""

    name = "boft"
    display_name = "BOFT"
    peft_type = "BOFT"
    action = "transform"
    containers: ClassVar[tuple[str, ...]] = ("boft_R", "boft_s")
    config_class = BOFTConfig
    peft_alpha_field = None
    peft_bias_only = "boft_only"
    peft_fields = frozenset({
        "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "init_weights", "bias",
        "fan_in_fan_out",
    })

    # ----- geometry -----
    @staticmethod
    def blocks(config: BOFTConfig, size: int) -> tuple[int, int, int]:
        """``(butterfly factors, blocks, block size)`` on a rotated size."""
        if config.boft_block_size:
            return config.boft_n_butterfly_factor, size // config.boft_block_size, config.boft_block_size
        return config.boft_n_butterfly_factor, config.boft_block_num, size // config.boft_block_num

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        factors, count, size = self.blocks(settings.config, OFTKind.rotated_size(layer))
        out_features = layer.lora_dims()[1]
        scale = (1, out_features) if isinstance(layer, ConvAdapters) else (out_features, 1)
        return [AdapterTensor("boft_R", (factors, count, size, size)), AdapterTensor("boft_s", scale)]

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)  # grouped convolutions are refused generically
        if not (layer_type is LinearAdapters or (layer_type is ConvAdapters and isinstance(module, nn.Conv2d))):
            raise ValueError(
                f"A BOFT adapter cannot go on {layer_name} ({type(module).__name__}): BOFT adapts {BOFT_LAYERS} (as "
                "PEFT). Leave it out with exclude_modules, or use LoraConfig for it."
            )
        config, size = settings.config, OFTKind.rotated_size(module)
        name, given = ("boft_block_size", config.boft_block_size)
        if not given:
            name, given = ("boft_block_num", config.boft_block_num)
        if not _fits(config, size, name, given):
            choices = [d for d in range(1, size + 1) if _fits(config, size, name, d)]
            closest = sorted(choices, key=lambda d: (abs(d - given), d))[:2]
            factor = config.boft_n_butterfly_factor
            rule = "must divide them" if factor == 1 else (
                f"must fit {factor} butterfly factors (even blocks; the block size times 2**{factor - 1} dividing "
                "them)"
            )
            fix = f"choose {name} from {closest}" if closest else "use fewer butterfly factors"
            raise ValueError(
                f"{name}={given} does not fit the {size} features BOFT rotates on {layer_name} "
                f"({type(module).__name__}): it {rule}; {fix}, or leave the layer out with exclude_modules."
            )
        check_one_rotation(layer_name, module)

    def scaling(self, settings: AdapterSettings) -> float:
        return 1.0  # boft_s is a trained tensor, not a fixed scale

    def describe(self, settings: AdapterSettings) -> str:
        config = settings.config
        blocks = f"boft_block_size={config.boft_block_size}" if config.boft_block_size else (
            f"boft_block_num={config.boft_block_num}"
        )
        return f"boft, {blocks}, boft_n_butterfly_factor={config.boft_n_butterfly_factor}"

    # ----- initialisation -----
    @torch.no_grad()
    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        generator, scale = layer.boft_R[adapter_name], layer.boft_s[adapter_name]
        if layer.lora_settings[adapter_name].config.init_weights:
            nn.init.zeros_(generator)
            nn.init.ones_(scale)
        else:  # PEFT's test init, in its order
            nn.init.normal_(generator, 0.0, 0.1)
            nn.init.normal_(scale, 1.0, 0.1)

    # ----- the rotation -----
    def rotations(self, layer: LoraLayer, adapter_name: str, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks ``[factors, blocks, bs, bs]``; with ``dropout`` (the forward), in training, some
        replaced by the identity. Merged weights never drop blocks (as PEFT's)."""
        config = layer.lora_settings[adapter_name].config
        generator = layer.boft_R[adapter_name]
        factors, count, size, _ = generator.shape
        flat = generator.reshape(factors * count, size, size)
        blocks = cayley(0.5 * (flat - flat.transpose(1, 2))).view(factors, count, size, size)
        if dropout and layer.training and config.boft_dropout > 0:
            chosen = int(torch.randint(0, factors, (1,)).item())  # PEFT drops blocks of one random factor
            blocks = torch.stack([
                multiplicative_dropout(factor, config.boft_dropout) if i == chosen else factor
                for i, factor in enumerate(blocks)
            ])
        return blocks

    @staticmethod
    def butterfly(z: torch.Tensor, blocks: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Every row vector of ``z`` (last dimension = the rotated size) times ``M``, or ``M^T`` if ``transposed``."""
        order = range(blocks.shape[0]) if transposed else reversed(range(blocks.shape[0]))
        for i in order:
            factor = blocks[i].transpose(-2, -1) if transposed else blocks[i]
            z = _shuffle(z, i, blocks.shape[-1], inverse=True)  # z P_i
            z = OFTKind.rotate_rows(z, factor)
            z = _shuffle(z, i, blocks.shape[-1])  # z P_i^T
        return z

    def transformed_forward(
        self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, base_forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``s * (W (M^T x)) + b``, computing the base operation once (``base_forward``)."""
        blocks = self.rotations(layer, adapter_name, dropout=True)
        scale = layer.boft_s[adapter_name]
        if isinstance(layer, ConvAdapters):
            weight = self._transform_weight(layer.weight, blocks, scale)
            result = layer.dense_output(x.to(weight.dtype), weight)
            return result if layer.bias is None else result + layer.channel_view(layer.bias).to(result.dtype)
        result = base_forward(self.butterfly(x.to(blocks.dtype), blocks).to(x.dtype))
        bias = layer.bias
        scaled = result * scale.view(-1) if bias is None else (result - bias) * scale.view(-1) + bias  # as PEFT
        return scaled.to(result.dtype)

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BOFT transforms the base computation: LoraLayer.forward calls transformed_forward.")

    # ----- merging -----
    def merged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``diag(s) W M^T`` in the weight's own layout."""
        return self._transform_weight(weight, self.rotations(layer, adapter_name), layer.boft_s[adapter_name])

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``diag(1 / s) W' M`` (``M`` is orthogonal), PEFT's unmerge."""
        blocks, scale = self.rotations(layer, adapter_name), layer.boft_s[adapter_name]
        flat = self.butterfly(weight.reshape(weight.shape[0], -1).to(blocks.dtype), blocks)
        return (flat * (1 / scale.reshape(-1, 1)).to(flat.dtype)).reshape(weight.shape).to(weight.dtype)

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        weight = layer.weight.detach()
        return self.merged_weight(layer, adapter_name, weight, {}) - weight

    def _transform_weight(self, weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1).to(blocks.dtype)  # [out, in * kernel], PEFT's (C, kh, kw) order
        rotated = self.butterfly(flat, blocks, transposed=True)
        return (rotated * scale.reshape(-1, 1).to(rotated.dtype)).reshape(weight.shape).to(weight.dtype)

    # ----- PEFT -----
    def peft_config_fields(self, config: BOFTConfig) -> dict[str, Any]:
        return {
            "boft_block_size": config.boft_block_size,
            "boft_block_num": config.boft_block_num,
            "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
            "boft_dropout": config.boft_dropout,
            "bias": self.peft_bias(config),
            "init_weights": config.init_weights,
        }

    def check_peft_export(self, adapter_name: str, config: AdapterConfig, layers: list[tuple[str, LoraLayer]]) -> None:
        for name, layer in layers:
            kernel = layer.lora_dims()[2]
            if kernel and kernel[0] != kernel[1]:
                raise ValueError(
                    f"{name} has a {kernel[0]}x{kernel[1]} kernel, but PEFT's BOFT sizes its rotation as if kernels "
                    f"were square (in_channels * kernel_size[0]**2), so it cannot load adapter {adapter_name!r}. "
                    "Save it with format='lightning_lora', or leave the layer out with exclude_modules."
                )

    def peft_import_tensor(
        self, layer: LoraLayer, adapter_name: str, layer_name: str, container: str, value: torch.Tensor
    ) -> torch.Tensor:
        factors = layer.lora_settings[adapter_name].config.boft_n_butterfly_factor
        expected = tuple(layer.boft_R[adapter_name].shape)
        if container == "boft_R" and factors > 1 and tuple(value.shape) == (1, *expected[1:]):
            raise ValueError(
                f"{layer_name}: the file's boft_R holds 1 butterfly factor, but its adapter_config.json says "
                f"boft_n_butterfly_factor={factors}. PEFT without its CUDA extension (fbd_cuda) silently trains with "
                "one factor and still writes the configured number, so this adapter computes with 1: set "
                '"boft_n_butterfly_factor": 1 in adapter_config.json and load it again.'
            )
        return value


def _fits(config: BOFTConfig, size: int, name: str, value: int) -> bool:
    """Whether ``name=value`` gives blocks that fit ``size`` features with the config's butterfly factors."""
    if size % value:
        return False
    count, block = (size // value, value) if name == "boft_block_size" else (value, size // value)
    spread = 2 ** (config.boft_n_butterfly_factor - 1)
    return spread == 1 or (block % 2 == 0 and count % spread == 0)


def _shuffle(z: torch.Tensor, index: int, block: int, inverse: bool = False) -> torch.Tensor:
    """``z P_i^T`` (or ``z P_i`` if ``inverse``) for butterfly factor ``index``: within every run of
    ``block * 2**index`` features, the even half-blocks before the odd ones (PEFT's ``block_butterfly_perm``)."""
    if index == 0:
        return z  # runs of one block: its two halves stay in place
    half, spread = block // 2, 2**index
    grid = (2, spread) if inverse else (spread, 2)
    runs = z.reshape(*z.shape[:-1], -1, *grid, half)
    return runs.transpose(-3, -2).reshape(z.shape)

"""OFT: orthogonal finetuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280; Liu et al. 2024, BOFT/OFTv2).

A block-diagonal rotation ``R = diag(R_1, ..., R_n)`` of ``oft_block_size``-sized blocks acts on what the base layer
reads: ``y = W (R^T x) + b``, so the merged weight is ``W R^T`` (``W`` viewed as ``[out, in * kernel]``) and the
pairwise angles between the weight's rows are kept. Each block is the Cayley transform of a skew-symmetric matrix
``Q`` whose upper triangle is the trainable ``oft_R`` (``[blocks, bs * (bs - 1) / 2]``): by default its Neumann
approximation ``I + 2Q + 2Q^2 + ... + Q^(T-1)`` (``T = num_cayley_neumann_terms``), else PEFT's exact
``(I - Q)(I + Q)^-1``. COFT keeps every ``Q`` within a Frobenius ball of radius ``eps``.

Linear layers rotate the input (one base matmul), embeddings rotate the looked-up vectors, 1x1 convolutions rotate
channels per pixel, and larger convolutions run once with the rotated kernel, so the unmerged and merged layer agree
and the output at init equals the base's. (PEFT's OFT folds overlapping patches back with a sum on kernels larger
than 1x1, which changes the output even at init; its files load here with the math of its merged weights.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.config.adapter_config import TARGETING_ARGS, AdapterConfig
from lightning_lora.core.config.fields import check_dropout
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor
from lightning_lora.core.layers.layer_types import ConvAdapters, EmbeddingAdapters, LinearAdapters, layer_type_of

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

OFT_LAYERS = "nn.Linear, nn.Embedding and nn.Conv2d"


@dataclass(kw_only=True)
class OFTConfig(AdapterConfig):
    __doc__ = """Configuration of one OFT adapter (PEFT's ``OFTConfig``).

    Adapts ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv2d``. Give exactly one of ``r`` and ``oft_block_size``;
    the other is derived per layer (``r * oft_block_size`` = the rotated size: ``in_features``, the embedding
    dimension, or ``in_channels * kernel`` of a convolution) and must divide it.

    Args:
        r: Number of rotation blocks per layer, or 0 to use ``oft_block_size``.
        oft_block_size: Size of each rotation block, or 0 to use ``r``.""" + TARGETING_ARGS + """
        module_dropout: In training, replace this share of a layer's blocks by the identity (multiplicative
            dropout; PEFT 0.21 builds it but never applies it).
        init_weights: True: every rotation starts as the identity; False: random rotations (for tests).
        coft: Constrained OFT: before every use, project each block's ``Q`` into a Frobenius ball of radius ``eps``.
        eps: COFT's radius (scaled by ``1 / sqrt(blocks)``).
        block_share: One rotation block shared by all blocks of a layer.
        use_cayley_neumann: Neumann-series approximation of the Cayley transform (no matrix inverse).
        num_cayley_neumann_terms: Terms of that series (at least 2: fewer give the identity).
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"Give exactly one of r (blocks per layer) and oft_block_size (size of a block), got r={self.r}, "
                f"oft_block_size={self.oft_block_size}; set the other to 0."
            )
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 2:
            raise ValueError(
                f"num_cayley_neumann_terms={self.num_cayley_neumann_terms} with use_cayley_neumann=True leaves every "
                "rotation the identity whatever oft_R holds, so the adapter computes nothing and never trains. Use at "
                "least 2 terms (PEFT's default 5), or use_cayley_neumann=False for the exact Cayley transform."
            )
        check_dropout("module_dropout", self.module_dropout)
        if not (is_finite_number(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be > 0 and finite, got {self.eps!r}; PEFT's default is 6e-5.")

    @property
    def kind(self) -> str:
        return "oft"

    def rank_for(self, module_name: str) -> int:
        return self.r


class OFTKind(AdapterKind):
    """``oft_R``: the upper triangles of the skew-symmetric generators, one row per block."""

    name = "oft"
    display_name = "OFT"
    peft_type = "OFT"
    action = "transform"
    containers: ClassVar[tuple[str, ...]] = ("oft_R",)
    config_class = OFTConfig
    peft_alpha_field = None
    peft_bias_only = "oft_only"
    peft_fields = frozenset({
        "r", "oft_block_size", "module_dropout", "init_weights", "coft", "eps", "block_share", "use_cayley_neumann",
        "num_cayley_neumann_terms", "bias", "fan_in_fan_out",
    })

    # ----- geometry -----
    @staticmethod
    def rotated_size(module: nn.Module) -> int:
        """The size the rotation acts on: in features, embedding dimension, or in channels times the kernel."""
        in_features, out_features, kernel = layer_type_of(module).lora_dims(module)
        return out_features if layer_type_of(module) is EmbeddingAdapters else in_features * math.prod(kernel)

    @staticmethod
    def blocks(config: OFTConfig, size: int) -> tuple[int, int]:
        """``(number of blocks, block size)`` on a rotated size."""
        return (config.r, size // config.r) if config.r else (size // config.oft_block_size, config.oft_block_size)

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        count, size = self.blocks(settings.config, self.rotated_size(layer))
        return [AdapterTensor("oft_R", (1 if settings.config.block_share else count, size * (size - 1) // 2))]

    def check_layer(self, layer_name: str, module: nn.Module, settings: AdapterSettings) -> None:
        layer_type = layer_type_of(module)
        if not (
            layer_type in (LinearAdapters, EmbeddingAdapters)
            or (layer_type is ConvAdapters and isinstance(module, nn.Conv2d))
        ):
            raise ValueError(
                f"An OFT adapter cannot go on {layer_name} ({type(module).__name__}): OFT adapts {OFT_LAYERS} (as "
                "PEFT). Leave it out with exclude_modules, or use LoraConfig for it."
            )
        config, size = settings.config, self.rotated_size(module)
        given, name = (config.r, "r") if config.r else (config.oft_block_size, "oft_block_size")
        if size % given:
            divisors = [d for d in range(1, size + 1) if size % d == 0]
            closest = sorted(divisors, key=lambda d: (abs(d - given), d))[:2]
            raise ValueError(
                f"{name}={given} does not divide the {size} features OFT rotates on {layer_name} "
                f"({type(module).__name__}); choose a divisor such as {closest}, or leave the layer out with "
                "exclude_modules."
            )
        check_one_rotation(layer_name, module)

    def scaling(self, settings: AdapterSettings) -> float:
        return 1.0  # a rotation has no scale

    def describe(self, settings: AdapterSettings) -> str:
        config = settings.config
        return f"oft, r={config.r}" if config.r else f"oft, oft_block_size={config.oft_block_size}"

    # ----- initialisation -----
    @torch.no_grad()
    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        generator = layer.oft_R[adapter_name]
        if layer.lora_settings[adapter_name].config.init_weights:
            nn.init.zeros_(generator)
        else:
            nn.init.normal_(generator, 0.0, 0.1)

    # ----- the rotation -----
    def rotation(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """The blocks ``[count, bs, bs]`` of the current rotation (COFT projects ``oft_R`` in place first)."""
        config = layer.lora_settings[adapter_name].config
        generator = layer.oft_R[adapter_name]
        count, size = self.blocks(config, self.rotated_size(layer))
        if config.coft:
            with torch.no_grad():
                generator.copy_(_project_into_ball(generator, size, config.eps))
        rows, cols = torch.triu_indices(size, size, 1, device=generator.device)
        upper = generator.new_zeros(generator.shape[0], size, size)
        upper[:, rows, cols] = generator
        skew = upper - upper.transpose(-2, -1)
        blocks = _cayley(skew, config)
        if layer.training and config.module_dropout > 0 and blocks.shape[0] > 1:
            blocks = multiplicative_dropout(blocks, config.module_dropout)
        return blocks.expand(count, size, size) if config.block_share else blocks

    @staticmethod
    def rotate_rows(z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Every row vector of ``z`` (last dimension = the rotated size) times the block-diagonal rotation."""
        shape = z.shape
        rotated = torch.einsum("...rk,rkc->...rc", z.reshape(*shape[:-1], blocks.shape[0], -1), blocks)
        return rotated.reshape(shape)

    def transformed_forward(
        self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, base_forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The layer's output with this rotation, computing the base operation once (``base_forward``)."""
        blocks = self.rotation(layer, adapter_name)
        if isinstance(layer, EmbeddingAdapters):
            result = base_forward(x)
            return self.rotate_rows(result.to(blocks.dtype), blocks).to(result.dtype)
        if isinstance(layer, ConvAdapters) and any(k != 1 for k in layer.kernel_size):
            weight = self.merged_weight(layer, adapter_name, layer.weight, {}, blocks)
            result = layer.dense_output(x.to(weight.dtype), weight)
            return result if layer.bias is None else result + layer.channel_view(layer.bias).to(result.dtype)
        if isinstance(layer, ConvAdapters):  # 1x1: the channels of every pixel
            rotated = self.rotate_rows(x.movedim(1, -1).to(blocks.dtype), blocks).movedim(-1, 1)
        else:
            rotated = self.rotate_rows(x.to(blocks.dtype), blocks)
        return base_forward(rotated.to(x.dtype))

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("OFT transforms the base computation: LoraLayer.forward calls transformed_forward.")

    # ----- merging -----
    def merged_weight(
        self,
        layer: LoraLayer,
        adapter_name: str,
        weight: torch.Tensor,
        record: dict[str, torch.Tensor],
        blocks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``W R^T`` (``E R`` for an embedding table ``E``) in the weight's own layout."""
        blocks = self.rotation(layer, adapter_name) if blocks is None else blocks
        return self._rotate_weight(layer, weight, blocks)

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        blocks = self.rotation(layer, adapter_name).detach()
        return self._rotate_weight(layer, weight, torch.linalg.inv(blocks.double()).to(blocks.dtype))

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        weight = layer.weight.detach()
        return self.merged_weight(layer, adapter_name, weight, {}) - weight

    def _rotate_weight(self, layer: LoraLayer, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        compute = blocks.dtype
        if isinstance(layer, EmbeddingAdapters):  # rows of the table are output vectors: E R
            return self.rotate_rows(weight.to(compute), blocks).to(weight.dtype)
        flat = weight.reshape(weight.shape[0], -1).to(compute)  # [out, in * kernel], PEFT's (C, kh, kw) order
        rotated = torch.einsum("ork,rck->orc", flat.reshape(flat.shape[0], blocks.shape[0], -1), blocks)
        return rotated.reshape(weight.shape).to(weight.dtype)

    # ----- PEFT -----
    def peft_tensor_leaf(self, layer: LoraLayer, container: str) -> str:
        return "oft_embedding_R.weight" if isinstance(layer, EmbeddingAdapters) else "oft_R.weight"

    def peft_export(self, layer: LoraLayer, adapter_name: str) -> tuple[dict[str, torch.Tensor], int, float]:
        tensors, _, alpha = super().peft_export(layer, adapter_name)
        return tensors, layer.lora_settings[adapter_name].config.r, alpha

    def peft_config_fields(self, config: OFTConfig) -> dict[str, Any]:
        return {
            "r": config.r,
            "oft_block_size": config.oft_block_size,
            "module_dropout": config.module_dropout,
            "bias": self.peft_bias(config),
            "init_weights": config.init_weights,
            "coft": config.coft,
            "eps": config.eps,
            "block_share": config.block_share,
            "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        }



def cayley(skew: torch.Tensor) -> torch.Tensor:
    """The exact Cayley transform ``(I - Q)(I + Q)^-1`` of skew-symmetric blocks ``[count, bs, bs]``, in PEFT's
    order of operations (a float32 identity: half-precision blocks are solved in float32)."""
    identity = torch.eye(skew.shape[-1], device=skew.device).expand_as(skew)
    return torch.linalg.solve(identity + skew, identity - skew, left=False).to(skew.dtype)



def check_one_rotation(layer_name: str, module: nn.Module) -> None:
    """Raise a ValueError naming the fix when ``module`` already holds a rotation (an adapter that transforms).

    Args:
        layer_name: The layer's name, for the message.
        module: The layer, adapted or not yet.
    """
    active = [(n, s.kind.display_name) for n, s in getattr(module, "lora_settings", {}).items()
              if s.kind.action == "transform"]  # fmt: skip
    if active:
        raise ValueError(
            f"{layer_name} already has the {active[0][1]} adapter {active[0][0]!r}; one rotation per layer is "
            "supported. Delete it first (delete_adapter) or leave the layer out with exclude_modules."
        )

def _cayley(skew: torch.Tensor, config: OFTConfig) -> torch.Tensor:
    """PEFT's rotation from skew-symmetric blocks, in its order of operations."""
    size = skew.shape[-1]
    if not config.use_cayley_neumann:
        return cayley(skew)
    terms = config.num_cayley_neumann_terms
    rotation = torch.eye(size, device=skew.device, dtype=skew.dtype).repeat(skew.shape[0], 1, 1)
    if terms > 1:
        rotation = rotation + 2.0 * skew
        if terms > 2:
            power = torch.bmm(skew, skew)
            rotation = rotation + 2.0 * power
            for _ in range(3, terms - 1):
                power = torch.bmm(power, skew)
                rotation = rotation + 2.0 * power
            rotation = rotation + torch.bmm(power, skew)
    return rotation


def _project_into_ball(generator: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: each block's skew matrix scaled back onto the Frobenius ball of radius ``eps / sqrt(blocks)``."""
    rows, cols = torch.triu_indices(size, size, 1, device=generator.device)
    upper = generator.new_zeros(generator.shape[0], size, size)
    upper[:, rows, cols] = generator
    skew = upper - upper.transpose(-2, -1)
    radius = eps / math.sqrt(skew.shape[0])
    norm = torch.linalg.matrix_norm(skew, keepdim=True)
    projected = torch.where(norm <= radius, skew, radius * (skew / norm))
    return projected[:, rows, cols]


def multiplicative_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Replace ``int(p * count)`` randomly chosen blocks by the identity (PEFT's ``MultiplicativeDropoutLayer``)."""
    count, size, _ = blocks.shape
    dropped = int(p * count)
    mask = torch.cat([torch.ones(dropped), torch.zeros(count - dropped)])[torch.randperm(count)]
    mask = mask.to(blocks.device, blocks.dtype).view(count, 1, 1)
    return (1 - mask) * blocks + mask * torch.eye(size, device=blocks.device, dtype=blocks.dtype)

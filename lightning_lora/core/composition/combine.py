"""Weighted combination of adapters into a new LoRA adapter (PEFT's ``add_weighted_adapter`` types).

Two families, as PEFT:

- Factor-wise (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the ``A`` matrices are
  combined with weights ``sign(w s) sqrt(|w s|)`` and the ``B`` matrices with ``sqrt(|w s|)`` (``s`` each adapter's
  scaling), so a single adapter comes back exactly; with several, ``B A`` has cross terms (an approximation). LoRA
  factors of equal rank on each layer.
- Update-wise (``cat`` and the ``*_svd`` types): ``cat`` stacks ``[w s A]`` and ``[B]`` (rank: the sum, exact); the
  SVD types combine the dense updates and keep the top ``svd_rank`` singular directions. The SVD types take every
  additive kind (LoRA, LoHa, LoKr, VeRA, AdaLoRA): the result is always a plain LoRA adapter.

The new adapter has scaling exactly 1 (``alpha = r``, no rsLoRA), so its update is what was combined. PEFT copies
the first adapter's config into the new one, so for rsLoRA adapters its result is ``sqrt(r)`` times too large; ours is
not (``tests/test_combine.py`` shows the difference).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.inits.svd_init import has_init_factors
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config
from lightning_lora.core.layers.adapter_tensors import adapter_parameters
from lightning_lora.core.surgery.inject import apply_lora

CombinationType = Literal[
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
]  # fmt: skip
FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_SVD_MERGE = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
              "magnitude_prune_svd": "magnitude_prune"}  # fmt: skip
_NEEDS_DENSITY = tuple(t for t in (*FACTOR_WISE, *SVD_TYPES) if t not in ("linear", "svd"))


# ----- how task tensors are merged (the TIES / DARE papers, as PEFT's merge_utils) -----
def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    keep = torch.zeros_like(tensor).reshape(-1)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def merge_task_tensors(
    method: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Merge same-shaped task tensors with one weight each.

    Args:
        method: ``"linear"`` (weighted sum), ``"magnitude_prune"`` (keep the ``density`` largest of each, then sum),
            ``"ties"`` (prune, elect the majority sign per entry, average the agreeing weighted entries),
            ``"dare_linear"`` / ``"dare_ties"`` (random pruning rescaled by ``1 / density`` instead of magnitude).
        tensors: The task tensors.
        weights: One weight per tensor.
        density: Fraction of entries kept by pruning, in ``(0, 1]``.
        majority_sign_method: ``"total"`` (sign of the sum) or ``"frequency"`` (sign of most entries).
        generator: Random source of DARE's pruning (default: torch's global generator, as PEFT).
    """
    if method in ("ties", "magnitude_prune") and density < 1:
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method.startswith("dare") and density < 1:
        tensors = [_random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *(1,) * (stacked.dim() - 1))
    if not method.endswith("ties"):
        return weighted.sum(dim=0)
    sign_source = stacked.sum(dim=0) if majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agrees = stacked.sign() == torch.where(sign_source >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


# ----- the public function -----
@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: CombinationType = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Add a LoRA adapter ``adapter_name`` that combines ``adapters`` with ``weights`` (PEFT's
    ``add_weighted_adapter``), on every layer any of them adapts; the active adapters and what trains stay as they
    were (the new adapter is frozen and inactive: ``set_active_adapters(model, adapter_name)`` uses it). It saves,
    exports to PEFT and merges like any LoRA adapter; ``modules_to_save`` of the sources are saved with it.

    Args:
        model: The model holding the adapters.
        adapters: Names of the adapters to combine.
        weights: One finite number per adapter (negative weights subtract).
        adapter_name: Name of the new adapter.
        combination_type: See the module docstring; a single adapter is always combined ``"linear"`` (as PEFT).
        svd_rank: Rank of the SVD types' result (default: the largest source rank). A layer that cannot hold that
            rank keeps every direction it has (``min(out, in)``, its whole combined update), with a warning.
        svd_clamp: SVD types: clamp ``U S`` and ``Vh`` to this quantile (in ``[0, 1]``) of their values.
        svd_full_matrices: ``torch.linalg.svd``'s ``full_matrices``.
        svd_driver: ``torch.linalg.svd``'s ``driver`` (CUDA only).
        density: Fraction kept by the pruning types (``ties``, ``dare_*``, ``magnitude_prune*``), in ``(0, 1]``.
        majority_sign_method: ``"total"`` or ``"frequency"`` for the TIES types.
        generator: Random source of the DARE types (default: torch's global generator, as PEFT).

    Returns:
        The same ``model``.

    Raises:
        ValueError: Unknown or duplicate names, a name in use, weights of another length or not finite numbers, a
            type that needs a density without one, a density outside ``(0, 1]``, an ``svd_clamp`` outside
            ``[0, 1]``, kinds the type cannot combine (named), factor-wise types on layers whose ranks differ,
            trained biases, a combination whose factors come out NaN/Inf. Nothing is changed then.
    """
    layers = _check(model, list(adapters), list(weights), adapter_name, combination_type, density,
                    majority_sign_method, svd_rank, svd_clamp)  # fmt: skip
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = {name: [layer.lora_settings[a].r for a in adapters if a in layer.lora_settings] for name, layer in layers}
    if combination_type == "cat":
        new_rank = max(sum(r) for r in ranks.values())
        for name, layer in layers:
            in_features, out_features, kernel = layer.lora_dims()
            if new_rank > min(in_features * math.prod(kernel), out_features):
                raise ValueError(
                    f"'cat' gives rank {new_rank} (the sum of the ranks), more than {name} can hold "
                    f"({min(in_features * math.prod(kernel), out_features)}). Use combination_type='svd' with an "
                    "svd_rank that fits."
                )
    elif combination_type in SVD_TYPES:
        new_rank = svd_rank or max(max(r) for r in ranks.values())
        narrow = {name: _max_rank(layer) for name, layer in layers if _max_rank(layer) < new_rank}
        if narrow and svd_rank is not None:  # asked for more than exists
            warnings.warn(
                f"svd_rank={new_rank} is more than {sorted(narrow)[:3]} can hold (ranks "
                f"{sorted(set(narrow.values()))}): those layers get rank {min(narrow.values())}.."
                f"{max(narrow.values())}, their whole combined update. "
                "Pass an svd_rank they can hold to silence this.",
                stacklevel=2,
            )
    else:
        new_rank = max(r[0] for r in ranks.values())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_settings]
        if combination_type == "cat":
            factors[name] = _cat(layer, present, new_rank)
        elif combination_type in SVD_TYPES:
            factors[name] = _svd(layer, present, combination_type, new_rank, svd_clamp, svd_full_matrices, svd_driver,
                                 density, majority_sign_method, generator)  # fmt: skip
        else:
            factors[name] = _factor_wise(layer, present, combination_type, density, majority_sign_method, generator)
    broken = [name for name, pair in factors.items() if not all(bool(t.isfinite().all()) for t in pair)]
    if broken:
        raise ValueError(
            f"Combining {list(adapters)} with weights {list(weights)} gives NaN/Inf factors on {broken[:3]}: a source "
            "adapter holds non-finite values, or the weights overflow. Nothing was added; check the adapters and use "
            "moderate weights."
        )
    _add_combined(model, adapters, adapter_name, factors, new_rank)
    return model


def _check(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    density: Optional[float],
    majority_sign_method: str,
    svd_rank: Optional[int],
    svd_clamp: Optional[float],
) -> list[tuple[str, LoraLayer]]:
    known = adapter_names(model)
    unknown = [a for a in adapters if a not in known]
    if not adapters or unknown or len(set(adapters)) != len(adapters):
        raise ValueError(
            f"adapters must name distinct adapters of the model ({known}); got {adapters}"
            + (f" ({unknown} unknown)." if unknown else ".")
        )
    if len(weights) != len(adapters):
        raise ValueError(f"Give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    bad = [w for w in weights if not is_finite_number(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers (one per adapter), got {weights}; {bad[0]!r} is not.")
    if adapter_name in known:
        raise ValueError(f"The model already has an adapter {adapter_name!r}; choose another name or delete it.")
    if combination_type not in (*FACTOR_WISE, *SVD_TYPES, "cat"):
        raise ValueError(
            f"combination_type must be one of {[*FACTOR_WISE, 'cat', *SVD_TYPES]}, got {combination_type!r}."
        )
    valid_density = is_finite_number(density) and 0 < density <= 1
    if combination_type in _NEEDS_DENSITY and len(adapters) > 1 and not valid_density:
        raise ValueError(f"combination_type={combination_type!r} needs a density in (0, 1] (the fraction of entries "
                         f"kept), got {density!r}.")  # fmt: skip
    if density is not None and not valid_density:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept) or None, got {density!r}.")
    if svd_clamp is not None and not (is_finite_number(svd_clamp) and 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1] (e.g. 0.99) or None, got {svd_clamp!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}.")
    svd_family = combination_type in SVD_TYPES and len(adapters) > 1
    for adapter in adapters:
        config = get_lora_config(model, adapter)
        if kind_of(config).has_bias(config):
            raise ValueError(f"Adapter {adapter!r} has a bias on B (lora_bias=True), which a combination has no "
                             "rule for; combine adapters trained without it.")  # fmt: skip
        if config.bias != "none":
            raise ValueError(f"Adapter {adapter!r} trains biases (bias={config.bias!r}), which a combination has no "
                             "rule for; combine adapters trained with bias='none'.")  # fmt: skip
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.lora_settings for a in adapters)]
    for name, layer in layers:
        if getattr(layer, "groups", 1) > 1:
            raise ValueError(
                f"{name} is a grouped convolution (groups={layer.groups}): the combined adapter's LoRA factors would "
                "be grouped, and no combination type has an exact rule for them. Combine adapters that leave it out "
                "(exclude_modules)."
            )
        for adapter in (a for a in adapters if a in layer.lora_settings):
            settings = layer.lora_settings[adapter]
            plain_lora = settings.kind.lora_factors and not has_init_factors(layer, adapter)
            if not (plain_lora or (svd_family and settings.kind.action == "add")):
                what = "an SVD-initialised LoRA (its base holds a residual)" if settings.kind.lora_factors else (
                    f"a {settings.kind.display_name} adapter")  # fmt: skip
                raise ValueError(
                    f"Adapter {adapter!r} on {name} is {what}: combination_type={combination_type!r} combines plain "
                    "LoRA factors. The SVD types (svd, ties_svd, ...) combine any additive kind (not DoRA or OFT, "
                    "which rescale or rotate what the base computes)."
                )
        ranks = {layer.lora_settings[a].r for a in adapters if a in layer.lora_settings}
        if combination_type in FACTOR_WISE and len(adapters) > 1 and len(ranks) > 1:
            raise ValueError(
                f"combination_type={combination_type!r} adds the factors of equal-rank adapters, but {name} has ranks "
                f"{sorted(ranks)}. Use 'cat' (exact, rank the sum) or 'svd' (rank svd_rank)."
            )
    return layers


def _max_rank(layer: LoraLayer) -> int:
    """The largest rank a LoRA factor pair of ``layer`` can have: ``min(out, in * kernel)``."""
    in_features, out_features, kernel = layer.lora_dims()
    return min(in_features * math.prod(kernel), out_features)


def _scaled_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    return layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach(), layer.scaling(adapter)


def _factor_wise(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    method: str,
    density: Optional[float],
    majority_sign_method: str,
    generator: Optional[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    As, Bs, weights_A, weights_B = [], [], [], []
    for adapter, weight in present:
        A, B, scaling = _scaled_factors(layer, adapter)
        scaled = weight * scaling
        # the sign on A only, so that B A gets the sign of w s once
        weights_A.append(abs(scaled) ** 0.5 * (1 if scaled >= 0 else -1))
        weights_B.append(abs(scaled) ** 0.5)
        As.append(A)
        Bs.append(B)
    merged = [
        merge_task_tensors(
            method, tensors, torch.tensor(w).to(tensors[0].device), density, majority_sign_method, generator
        )
        for tensors, w in ((As, weights_A), (Bs, weights_B))
    ]
    return merged[0].to(As[0].dtype), merged[1].to(Bs[0].dtype)


def _cat(layer: LoraLayer, present: list[tuple[str, float]], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    As, Bs = [], []
    for adapter, weight in present:
        A, B, scaling = _scaled_factors(layer, adapter)
        As.append(A * (weight * scaling))
        Bs.append(B)
    A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    pad = new_rank - A.shape[0]  # zero rows and columns where this layer's ranks sum to less (as PEFT)
    return (
        torch.cat([A, A.new_zeros(pad, *A.shape[1:])]),
        torch.cat([B, B.new_zeros(B.shape[0], pad, *B.shape[2:])], 1),
    )


def _svd(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    method: str,
    new_rank: int,
    clamp: Optional[float],
    full_matrices: bool,
    driver: Optional[str],
    density: Optional[float],
    majority_sign_method: str,
    generator: Optional[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [layer.weight_out_in(layer.delta_weight(adapter)) for adapter, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = merge_task_tensors(_SVD_MERGE[method], deltas, weights, density, majority_sign_method, generator)
    U, S, Vh = torch.linalg.svd(delta.flatten(1), full_matrices=full_matrices, driver=driver)
    rank = min(new_rank, S.numel())  # a layer narrower than svd_rank keeps all it has
    B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    shape_A, shape_B = layer.adapter_shapes(rank)
    return A.reshape(shape_A), B.reshape(shape_B)


def _add_combined(
    model: nn.Module,
    adapters: Sequence[str],
    adapter_name: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    new_rank: int,
) -> None:
    sources = [get_lora_config(model, a) for a in adapters]
    saved = list(dict.fromkeys(m for c in sources for m in (c.modules_to_save or [])))
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    exactly = {name: f"^{re.escape(name)}$" for name in factors}  # rank/alpha pattern keys for one layer each
    config = LoraConfig(
        r=new_rank, alpha=float(new_rank), target_modules="|".join(re.escape(name) for name in factors),
        modules_to_save=saved or None,
        rank_pattern={exactly[name]: r for name, r in ranks.items() if r != new_rank},
        alpha_pattern={exactly[name]: float(r) for name, r in ranks.items() if r != new_rank},
    )  # fmt: skip
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    active = {layer: list(layer.active_adapters) for _, layer in lora_layers(model)}
    apply_lora(model, config, adapter_name, initialize=False)
    for name, layer in lora_layers(model):
        if name in factors:
            A, B = factors[name]
            layer.lora_A[adapter_name].copy_(A)
            layer.lora_B[adapter_name].copy_(B)
            layer.lora_settings[adapter_name].initialized = True
        layer.active_adapters = active.get(layer, [a for a in layer.active_adapters if a != adapter_name])
    for parameter, flag in trainable:
        parameter.requires_grad_(flag)
    for _, parameter in adapter_parameters(model, adapter_name):
        parameter.requires_grad_(False)

"""EVA: explained variance adaptation (Paischer et al. 2024, https://arxiv.org/abs/2410.07170).

``A`` starts as the top right-singular vectors of the layer's inputs over calibration batches (an incremental SVD,
one batch at a time, until the components stop moving: cosine similarity ``>= tau`` between two batches), ``B`` as
zero, so the model's outputs are unchanged and the base weight is untouched. The ranks are then redistributed: the
sum of the configured ranks goes to the components that explain the largest share of their layer's input variance,
each layer getting at most ``round(r * rho)``; a layer may end with another rank (its alpha scaled along, with
``adjust_scaling_factors``) or none (its adapter is removed). The config written on the adapter records the result
in ``rank_pattern``/``alpha_pattern`` (and in ``target_modules`` when layers lost their adapter), so checkpoints
and adapter files rebuild the same shapes, and the adapter exports to PEFT as a plain LoRA.

The algorithm is PEFT 0.21's ``get_eva_state_dict``/``initialize_lora_eva_weights``, step for step: the batches
are cycled until every layer's needed components have converged; layers that see identical inputs (``q``, ``k``
and ``v`` projections) share one SVD; under ``torch.distributed`` each step uses the inputs of every process (all
gathered), so every process reaches the same components and ranks. (PEFT whitens the components of layers sharing
an SVD twice; this module whitens each once.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from lightning_lora.core.common.distributed import copy_into, is_distributed, is_dtensor
from lightning_lora.core.config.fields import pattern_matches
from lightning_lora.core.config.lora_config import EvaConfig, LoraConfig
from lightning_lora.core.inits.calibration_run import CalibrationRun, calibrating, register_calibration
from lightning_lora.core.inits.incremental_pca import IncrementalPCA
from lightning_lora.core.inits.initializers import CALIBRATION, register_initializer
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.containers import AdapterDict
from lightning_lora.core.layers.layer_types import LinearAdapters

MAX_PASSES = 1000  # passes over the calibration batches before EVA gives up waiting for convergence
_RHO_CEILING = 1000


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, concatenated in rank order (padded all-gather, as PEFT); ``rows`` alone on one
    process. Collective: every process must call it."""
    if not is_distributed():
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    counts = [int(size) for size in sizes]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([tensor[:count] for tensor, count in zip(gathered, counts)])


class _SVDHook:
    """One layer's incremental SVD and its convergence (PEFT's ``SVDHook``)."""

    def __init__(self, name: str, n_components: int, tau: float, run: CalibrationRun) -> None:
        self.name, self.run, self.tau = name, run, tau
        self.svd = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        states = gather_rows(self.run.token_rows(inputs[0], self.name))
        if states.size(0) < self.svd.n_components:
            return  # fewer rows than components: PEFT skips the step too
        self.svd.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.svd.components_
        if components.dim() == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(components, previous) >= self.tau


class _HashHook:
    """A digest of the layer's first inputs, to find layers that see the same inputs."""

    def __init__(self, name: str, run: CalibrationRun) -> None:
        self.name, self.run, self.digest = name, run, None

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        rows = gather_rows(self.run.token_rows(inputs[0], self.name)).detach().cpu().contiguous()
        data = rows.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
        self.digest = (tuple(rows.shape), str(rows.dtype), hashlib.sha256(data).hexdigest())


def eva_components(
    layers: dict[str, LoraLayer], adapter_name: str, batches: Iterable[Any], run: CalibrationRun, config: EvaConfig
) -> dict[str, torch.Tensor]:
    """EVA's ``{layer name: A}`` (``[new rank, in]``, float32; ``[0, in]`` for a layer left without rank) from
    calibration batches: PEFT's ``_get_eva_state_dict``.

    Args:
        layers: The adapted layers, by name, in module order.
        adapter_name: The EVA adapter (its per-layer ranks are the budget).
        batches: Calibration batches; cycled (and kept in memory, as ``itertools.cycle``) until convergence.
        run: Runs one batch through the model with the token mask set (see ``calibrate_adapters``).
        config: EVA's options.
    """
    ranks = {name: layer.lora_settings[adapter_name].r for name, layer in layers.items()}
    rho = config.rho
    if rho > _RHO_CEILING:
        max_dim = max(max(p.shape) for layer in layers.values() for p in layer.parameters())
        rho = min(rho, max_dim // min(ranks.values()))
    max_components = {name: round(r * rho) for name, r in ranks.items()}
    for name, layer in layers.items():
        in_features = layer.lora_dims()[0]
        if max_components[name] > in_features:
            raise ValueError(
                f"EVA: {name} would keep up to round(r * rho) = {max_components[name]} components of its "
                f"{in_features} input features; lower r (rank_pattern) or eva_config.rho."
            )
    rank_budget = sum(ranks.values())
    kept: list[Any] = []
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("EVA: no calibration batches were given; pass at least one batch.") from None
    kept.append(first)

    hashes = {name: _HashHook(name, run) for name in layers}
    handles = [layers[name].register_forward_hook(hook) for name, hook in hashes.items()]
    try:
        run(first)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[Any, list[str]] = defaultdict(list)
    for name, hook in hashes.items():
        groups[hook.digest].append(name)
    equal_inputs = [names for names in groups.values() if len(names) > 1]
    equal_inputs_map = {other: names[0] for names in equal_inputs for other in names[1:]}
    for names in equal_inputs:
        largest = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = largest

    hooks = {n: _SVDHook(n, max_components[n], config.tau, run) for n in layers if n not in equal_inputs_map}
    handles = {name: layers[name].register_forward_hook(hook) for name, hook in hooks.items()}
    layer_hook_map = {**{name: name for name in hooks}, **equal_inputs_map}
    converged_layers = dict.fromkeys(hooks, False)
    rank_dist = dict(max_components)
    steps = 0
    try:
        for batch in _cycle(first, iterator, kept):
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not converged_layers[name] and converged:
                    handles.pop(name).remove()
                    converged_layers[name] = True
                elif converged_layers[name] and not converged:
                    handles[name] = layers[name].register_forward_hook(hook)
                    converged_layers[name] = False
            if all(converged_layers.values()):
                break
            run(batch)
            steps += 1
            unfitted = [name for name, hook in hooks.items() if hook.svd.components_ is None]
            if not unfitted:
                rank_dist = _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components)
            elif steps > len(kept):  # every batch was too small for some layer (PEFT would cycle forever)
                raise ValueError(
                    f"EVA: no calibration batch holds {max_components[unfitted[0]]} rows (positions that count) for "
                    f"{unfitted[0]}'s incremental SVD; use larger batches or a smaller r / eva_config.rho."
                )
        else:
            raise ValueError(
                f"EVA: the components of {[n for n, c in converged_layers.items() if not c][:3]} did not converge "
                f"within {MAX_PASSES} passes over the {len(kept)} calibration batches; give more (or more varied) "
                f"batches, or lower eva_config.tau (now {config.tau})."
            )
    finally:
        for handle in handles.values():
            handle.remove()

    components = {}
    for name in layers:
        rank = rank_dist[name]
        hook = hooks[layer_hook_map[name]]
        u = hook.svd.components_[:rank].clone()
        if config.whiten:
            u = u / hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        components[name] = u
    return components


def _cycle(first: Any, iterator: Any, kept: list[Any]) -> Iterable[Any]:
    """``itertools.cycle`` over ``first`` and the rest of ``iterator`` (PEFT cycles the dataloader from its start),
    stopping after ``MAX_PASSES`` passes."""
    yield first
    for batch in iterator:
        kept.append(batch)
        yield batch
    for _ in range(MAX_PASSES - 1):
        yield from kept


def _rank_distribution(
    hooks: dict[str, _SVDHook], layer_hook_map: dict[str, str], equal_inputs_map: dict[str, str], rank_budget: int,
    max_components: dict[str, int],
) -> dict[str, int]:  # fmt: skip
    """The ``rank_budget`` components with the largest explained-variance ratios, counted per layer."""
    ratios = {k: h.svd.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook_map.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:rank_budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook_map}
    for k, k_hook in equal_inputs_map.items():
        rank, rank_hook = counts[k], counts[k_hook]
        if rank_hook < rank:  # the layer that holds the SVD gets the larger rank
            counts[k_hook], counts[k] = rank, rank_hook
    return counts


def eva_config_with_ranks(
    config: LoraConfig, ranks: dict[str, int], alphas: dict[str, float], all_names: list[str]
) -> LoraConfig:
    """The adapter's config after EVA: ``rank_pattern``/``alpha_pattern`` give every layer its new rank and alpha
    (exact full-name keys, longest first, so no key reaches another layer), and ``target_modules`` names the layers
    that kept an adapter when some lost theirs (PEFT rewrites the same three fields)."""
    kept = [name for name in all_names if ranks[name] > 0]
    rank_pattern = _exact_patterns({n: ranks[n] for n in kept}, config.r)
    alpha_pattern = _exact_patterns({n: alphas[n] for n in kept}, config.alpha)
    target_modules = config.target_modules
    if len(kept) < len(all_names):
        target_modules = "(?:" + "|".join(re.escape(name) for name in kept) + ")"
    return dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                               target_modules=target_modules)  # fmt: skip


def _exact_patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """Pattern entries for the names whose value is not ``default``, plus any name a shorter entry would reach."""
    chosen = {name for name, value in values.items() if value != default}
    grew = True
    while grew:
        reached = {n for n in values if n not in chosen and any(pattern_matches(n, re.escape(c)) for c in chosen)}
        grew = bool(reached)
        chosen |= reached
    return {re.escape(name): values[name] for name in sorted(chosen, key=len, reverse=True)}


@torch.no_grad()
def apply_eva_ranks(
    model: nn.Module, adapter_name: str, components: dict[str, torch.Tensor], resize: bool = True
) -> LoraConfig:
    """Give every layer of the adapter its EVA rank: new (zero, pending) tensors where the rank changed (where it is
    0, the calibration runner takes the adapter off), and store each layer's components for the init. Returns the
    adapter's new config (also set on its layers).

    Raises:
        ValueError: A rank changes while the adapter tensors are sharded (DTensor) or ``resize`` is False; nothing
            is changed then.
    """
    layers = {name: model.get_submodule(name) for name in components}
    config = next(iter(layers.values())).lora_settings[adapter_name].config
    old = {name: layer.lora_settings[adapter_name] for name, layer in layers.items()}
    ranks = {name: components[name].shape[0] for name in layers}
    adjust = (config.eva_config or EvaConfig()).adjust_scaling_factors
    alphas = {
        name: s.alpha * ranks[name] / s.r if ranks[name] != s.r and adjust else s.alpha for name, s in old.items()
    }
    changed = [name for name in layers if ranks[name] != old[name].r]
    sharded = any(is_dtensor(layer.lora_A[adapter_name]) for layer in layers.values())
    if changed and (sharded or not resize):
        raise ValueError(
            f"EVA redistributed the ranks of adapter {adapter_name!r} ({changed[0]}: {old[changed[0]].r} -> "
            f"{ranks[changed[0]]}, ...), but its tensors can no longer change shape "
            f"({'sharded' if sharded else 'a training strategy or optimizer holds them'}). Use "
            "LoraConfig(eva_config=EvaConfig(rho=1.0)) (no redistribution), or calibrate before the model is "
            "wrapped, sharded or given to an optimizer (one device). Nothing was changed."
        )
    new_config = eva_config_with_ranks(config, ranks, alphas, list(layers))
    for name, layer in layers.items():
        settings = old[name]
        if ranks[name] == 0:
            continue  # the calibration runner takes the adapter off this layer
        if ranks[name] != settings.r:
            _resize(layer, adapter_name, ranks[name])
        settings.r, settings.alpha, settings.config = ranks[name], alphas[name], new_config
        layer.__dict__.setdefault(CALIBRATION, {})[adapter_name] = {"components": components[name]}
    return new_config


def _resize(layer: LoraLayer, adapter_name: str, r: int) -> None:
    settings = layer.lora_settings[adapter_name]
    resized = dataclasses.replace(settings, r=r)
    for tensor in settings.kind.tensors(layer, resized):
        old = getattr(layer, tensor.name)[adapter_name]
        value = torch.zeros(tensor.shape, device=old.device, dtype=old.dtype)
        container = getattr(layer, tensor.name)
        assert isinstance(container, AdapterDict)
        container[adapter_name] = nn.Parameter(value, requires_grad=old.requires_grad)


def _eva_init(layer: LoraLayer, adapter_name: str) -> None:
    """``A`` = the layer's EVA components, ``B`` = 0 (the base weight is not touched).

    Without components (an adapter file about to overwrite both, see ``load_adapter``) both start at zero;
    ``initialize_pending_adapters`` never gets here without them (it names ``calibrate_adapters``)."""
    statistics = layer.__dict__.get(CALIBRATION, {}).get(adapter_name)
    lora_A = layer.lora_A[adapter_name]
    if statistics is None:
        lora_A.zero_()
    else:
        copy_into(lora_A, statistics["components"].to(lora_A.dtype))  # a DTensor shard gets its part
        del layer.__dict__[CALIBRATION][adapter_name]
    layer.lora_B[adapter_name].zero_()


register_initializer("eva", _eva_init, layer_types=(LinearAdapters,), needs_data=True, reads_weight=False)


def calibrate_eva(
    model: nn.Module,
    adapter_name: str,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    run: CalibrationRun,
    resize: bool,
) -> dict[str, int]:
    """EVA's calibration hook: the components of each layer's inputs, and the ranks they redistribute."""
    eva = next(iter(layers.values())).lora_settings[adapter_name].config.eva_config or EvaConfig()
    run.label_mask_value = eva.label_mask_value if eva.use_label_mask else None
    try:
        with calibrating(model):
            components = eva_components(layers, adapter_name, batches, run, eva)
    finally:
        run.label_mask_value = None
    apply_eva_ranks(model, adapter_name, components, resize=resize)
    return {name: int(c.shape[0]) for name, c in components.items()}


register_calibration(["eva"], calibrate_eva)

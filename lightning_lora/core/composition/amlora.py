"""AM-LoRA (Liu et al. 2024, https://arxiv.org/abs/2409.19611): continual learning with one LoRA per task, mixed by a
learned attentional selector in every adapted layer, with an L1 term that makes the selection sparse.

Each adapted layer computes every task adapter's output ``f_i = Δw_i x`` (its usual ``scaling * B_i A_i x``) and
scores it with a dense layer of its own, ``s_i = w_iᵀ f_i + b_i`` (one weight vector over the output features and one
bias per task and per layer). The layer outputs ``W_0 x + Σ_i g_i f_i``, one weight ``g_i`` per position of the
output's leading dimensions (batch, sequence): the mixture is per token. ``gate`` says how scores become weights:

- ``"softmax"`` (the paper's): ``g = softmax([s_0, s_1, ..., s_n])`` over the task adapters and a *zero LoRA*
  ``Δw_0 = 0`` whose score ``s_0`` is a learned bias per layer (its dense layer sees only zeros). The paper sums over
  ``i = 0..n`` for tasks ``1..n`` and names a zero LoRA matrix; the zero slot is what lets the selector give the
  adapters less than everything.
- ``"relu"``: ``g_i = relu(s_i)`` without normalisation; the bias starts at 1, so at the start the layer computes the
  plain sum of its adapters.

The L1 term is ``L1 = (1 / n_layers) Σ_layers mean_positions Σ_i |g_i|`` over the task adapters (not the zero slot).
The L1 norm of a whole softmax vector is always 1 and has no gradient, so we penalise the task adapters' share:
with ``"softmax"`` it is ``1 - g_0``, the mass the selector spends on adapters at all; with ``"relu"`` it is a plain
Lasso on independent weights, which drives irrelevant adapters' weights exactly to 0. An L1 on the scores before the
softmax would push them to 0, i.e. towards uniform (dense) weights, the opposite of the stated aim; it is not offered.

Reading of the sources (the arXiv text past the abstract was not readable here; reviews of the paper were):
"for each task-specific LoRA feature, a corresponding dense layer performs a non-linear transformation, then a
Softmax gives the task's attention score g_i; all LoRAs' features are aggregated with these weights:
h = W_0 + Σ_{i=0}^{n} g_i ..." (themoonlight.io review, translated); the earlier tasks' LoRAs are frozen and only
the current task's LoRA trains, with the selector. A bounded non-linearity on a scalar score (tanh) would cap the
softmax ratio at ``e^2`` and forbid a sparse selection, so the score stays linear; the softmax (or ReLU) is the
non-linearity.

The selector is a child of the model (``model.amlora_selector``), so it trains, checkpoints and loads like any
trainable parameter. Adapted layers reach it through their ``forward_plan`` (:class:`AmLoraGate`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.common.modules import check_takes_child
from lightning_lora.core.composition.amlora_selector import AttentionalSelector, LayerSelector
from lightning_lora.core.inits.svd_init import has_init_factors
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, saved_module_state
from lightning_lora.core.layers.adapter_tensors import adapter_parameters
from lightning_lora.core.layers.forward_plan import check_free_for, install_plan, plan_of, remove_plan
from lightning_lora.core.layers.layer_types import LinearAdapters, check_weighs_per_position

SELECTOR_NAME = "amlora_selector"
GATES = ("softmax", "relu")
_STATE_ATTRIBUTE = "_amlora_state"


class _AmLoraState:
    """What :func:`add_amlora` attached to a model: the adapters in order, the L1 gradient weight and the weights of
    the last forward (``{layer name: [..., n]}``, with their autograd graph)."""

    def __init__(self, adapters: list[str], gate: str) -> None:
        self.adapters, self.gate = adapters, gate
        self.l1_weight = 0.0
        self.n_layers = 0
        self.latest: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "latest": {}}  # the last forward's tensors belong to its graph


class AmLoraGate:
    """The plan one adapted layer follows (its ``forward_plan``): ``W_0 x + Σ_i g_i f_i`` with its selector's weights.

    Args:
        state: The model's AM-LoRA state (shared by every gated layer).
        layer_name: The layer's name in the model.
        selector: The layer's :class:`LayerSelector`.
    """

    plan_name = "AM-LoRA's selector"
    removal = "call remove_amlora(model)"
    capabilities: frozenset[str] = frozenset()  # task weights per token: no merged weight computes it

    def __init__(self, state: _AmLoraState, layer_name: str, selector: LayerSelector) -> None:
        self.state, self.layer_name, self.selector = state, layer_name, selector

    def forward(
        self,
        layer: LoraLayer,
        x: torch.Tensor,
        base_forward: Callable[..., torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The base output plus the selector-weighted sum of the task adapters' outputs."""
        adapters = [name for name in self.state.adapters if name in layer.lora_settings]
        if any(name in layer.merged_adapters for name in adapters):
            raise ValueError(f"AM-LoRA: adapters are merged into {self.layer_name}; call unmerge_lora(model) first.")
        result = base_forward(x, *args, **kwargs)
        for name in adapters:
            if not layer.lora_settings[name].initialized:
                layer._raise_uninitialized(name)
        if all(_low_rank(layer, name) for name in adapters):
            return self._low_rank_forward(layer, x, result, adapters)
        zero = result.new_zeros(())
        features = [layer.lora_settings[n].kind.forward(layer, n, x, zero) for n in adapters]  # f_i = Δw_i x
        scores = torch.stack([self.selector.score(n, f) for n, f in zip(adapters, features)], dim=-1)
        task_weights = self._weights(scores, len(adapters))
        for k, f in enumerate(features):
            result = result + task_weights[..., k : k + 1].to(f.dtype) * f
        return result

    def _low_rank_forward(
        self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, adapters: list[str]
    ) -> torch.Tensor:
        """Plain LoRA on a linear layer: scores and weights on the rank-``r`` intermediates ``h_i = s_i A_i x``, and
        one product with ``[B_1, ..., B_n]`` for ``Σ g_i B_i h_i`` (the same numbers as the features path)."""
        hs, factors_B = [], []
        for name in adapters:
            settings = layer.lora_settings[name]
            lora_A, lora_B = settings.kind.factors(layer, name)
            h = F.linear(layer.adapter_input(x, settings.dropout, lora_A.dtype), lora_A) * settings.scaling
            hs.append(h)
            factors_B.append(lora_B)
        scores = torch.stack([self.selector.low_rank_score(n, h, B) for n, h, B in zip(adapters, hs, factors_B)], -1)
        task_weights = self._weights(scores, len(adapters))
        mixed = torch.cat([task_weights[..., k : k + 1].to(h.dtype) * h for k, h in enumerate(hs)], dim=-1)
        update = F.linear(mixed, torch.cat(factors_B, dim=1).to(mixed.dtype))
        return (result + update).to(result.dtype)

    def _weights(self, scores: torch.Tensor, n_adapters: int) -> torch.Tensor:
        """The task adapters' weights (recorded for :func:`amlora_l1`), with the L1 gradient hook when training."""
        weights = self.selector(scores)
        task_weights = weights[..., 1:] if self.selector.zero_score is not None else weights
        self.state.latest[self.layer_name] = task_weights
        if self.state.l1_weight > 0 and task_weights.requires_grad:
            # λ·∂L1/∂g joins the backward of whatever loss uses this output: as if λ·L1 were added to that loss.
            positions = task_weights.numel() // n_adapters
            coefficient = self.state.l1_weight / (self.state.n_layers * positions)
            sign = torch.sign(task_weights.detach())
            task_weights.register_hook(lambda grad: grad + coefficient * sign.to(grad.dtype))
        return task_weights


def _low_rank(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether the adapter is a plain LoRA on a linear layer (its features are ``B h``, ``h`` of rank ``r``)."""
    settings = layer.lora_settings[adapter_name]
    return settings.kind.plain_factors(settings) and isinstance(layer, LinearAdapters)


def add_amlora(
    model: nn.Module,
    adapter_name: str,
    earlier_adapters: Optional[Sequence[str]] = None,
    gate: str = "softmax",
    l1_weight: float = 0.0,
) -> nn.Module:
    """Mix the task adapters of ``model`` with AM-LoRA's attentional selector, for training task ``adapter_name``.

    Adds ``model.amlora_selector`` (trainable), freezes the earlier tasks' adapters and what is saved with them alone
    (a head the new adapter also saves keeps training), and makes every adapted layer holding one of the adapters
    compute ``W_0 x + Σ_i g_i Δw_i x``. Called again on a model that has AM-LoRA (the next task, or the same call
    once more), it keeps the learned dense layers and adds those of adapters new to the selector.

    Args:
        model: A model with the earlier tasks' adapters and the new task's (``apply_lora``, ``load_adapter``).
        adapter_name: The adapter of the task being trained (it keeps training).
        earlier_adapters: The earlier tasks' adapters, in task order; default: every other adapter of the model.
        gate: ``"softmax"`` (the paper's, with a zero LoRA slot) or ``"relu"`` (unnormalised, sparse under L1).
        l1_weight: ``λ >= 0``: every backward through the layers adds the gradient of ``λ * L1`` (see
            :func:`amlora_l1`), as if it were added to the loss. 0: add ``λ * amlora_l1(model)`` yourself, or none.

    Returns:
        The same ``model``.

    Raises:
        ValueError: No earlier adapter, an unknown or repeated adapter, an adapter that does not add to the base
            output (DoRA, OFT) or was SVD-initialised, one on a convolution or merged, an unknown ``gate`` or one
            other than the model's, a negative ``l1_weight``, earlier adapters missing some the selector already
            mixes, X-LoRA on the model. Nothing is changed on error.

    Example::

        apply_lora(model, config, "task2")             # task1 was trained (or load_adapter'ed) before
        add_amlora(model, "task2", gate="softmax", l1_weight=0.01)
        loss = loss_fn(model(x), y); loss.backward()    # trains task2's adapter and model.amlora_selector
    """
    known = adapter_names(model)
    earlier = [n for n in known if n != adapter_name] if earlier_adapters is None else list(earlier_adapters)
    adapters = [*earlier, adapter_name]
    layers = _check(model, adapters, gate, l1_weight)
    state: Optional[_AmLoraState] = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        state = _AmLoraState(adapters, gate)
        model.add_module(SELECTOR_NAME, AttentionalSelector(gate))
        model.__dict__[_STATE_ATTRIBUTE] = state
    selector: AttentionalSelector = getattr(model, SELECTOR_NAME)
    for layer_name, layer in layers:
        key = _selector_key(layer_name)
        held = [name for name in adapters if name in layer.lora_settings]
        like = next(t for _, t in _layer_tensors(layer, held[0]))
        if key not in selector.layers:
            selector.layers[key] = LayerSelector(layer.lora_dims()[1], gate, like)
        layer_selector = selector.layers[key]
        for name in held:
            if name not in layer_selector.weight:
                layer_selector.add(name, like)
        install_plan(layer, AmLoraGate(state, layer_name, layer_selector))
    state.adapters, state.n_layers, state.l1_weight = adapters, len(layers), float(l1_weight)
    selector.requires_grad_(True)
    shared = {key for key, _ in saved_module_state(model, adapter_name)}  # e.g. a head every task trains
    parameters = dict(model.named_parameters())
    for name in earlier:
        for _, parameter in adapter_parameters(model, name):
            parameter.requires_grad_(False)
        for key, _ in saved_module_state(model, name):
            if key not in shared and key in parameters:
                parameters[key].requires_grad_(False)
    return model


def _selector_key(layer_name: str) -> str:
    return f"{layer_name.replace('.', '-')}-selector"


def _layer_tensors(layer: LoraLayer, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
    return [(c, getattr(layer, c)[adapter_name]) for c in layer.adapter_containers(adapter_name)]


def _check(model: nn.Module, adapters: list[str], gate: str, l1_weight: float) -> list[tuple[str, LoraLayer]]:
    check_takes_child(model, SELECTOR_NAME, "AM-LoRA")
    known = adapter_names(model)
    if gate not in GATES:
        raise ValueError(f"AM-LoRA: gate must be one of {GATES}, got {gate!r}.")
    check_l1_weight(l1_weight)
    unknown = [name for name in adapters if name not in known]
    if unknown:
        raise ValueError(
            f"AM-LoRA: unknown adapter(s) {unknown}; the model has {known}. Add the new task's adapter with "
            "apply_lora (or LoraCallback), load earlier ones with load_adapter(model, directory, adapter_name=...)."
        )
    if len(adapters) < 2:
        raise ValueError(
            f"AM-LoRA mixes the earlier tasks' adapters with the new one ({adapters[-1]!r}), and the model has no "
            "earlier adapter: train the first task with plain LoRA, then load its adapter before the second task."
        )
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"AM-LoRA: adapters {adapters} name an adapter twice (earlier_adapters holds the new one?).")
    others = [(name, layer) for name, layer in lora_layers(model) if not isinstance(plan_of(layer), AmLoraGate)]
    check_free_for(others, AmLoraGate.plan_name)  # a later task re-gates AM-LoRA's own layers
    state: Optional[_AmLoraState] = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None:
        if state.gate != gate:
            raise ValueError(f"AM-LoRA is on the model with gate={state.gate!r}, not {gate!r}; keep the same gate.")
        dropped = [name for name in state.adapters if name not in adapters]
        if dropped:
            raise ValueError(
                f"AM-LoRA already mixes {dropped} on this model; keep them among earlier_adapters, or call "
                "remove_amlora(model) first."
            )
    layers = []
    for layer_name, layer in lora_layers(model):
        held = [name for name in adapters if name in layer.lora_settings]
        if not held:
            continue
        for name in held:
            settings = layer.lora_settings[name]
            if settings.kind.action != "add" or has_init_factors(layer, name):
                what = f"{settings.kind.display_name}, which does not add to the base output"
                if settings.kind.action == "add":
                    what = "SVD-initialised (its base weight holds a residual)"
                raise ValueError(
                    f"AM-LoRA weighs adapters that add to the base output; {name!r} on {layer_name} is {what}. "
                    "Leave it out with earlier_adapters=[...], or train with a plain LoRA config."
                )
        check_weighs_per_position("AM-LoRA", layer_name, layer, held)
        layers.append((layer_name, layer))
    keys = [_selector_key(name) for name, _ in layers]
    if len(set(keys)) != len(keys):
        raise ValueError("AM-LoRA: two adapted layers' names differ only by '.' and '-'; rename one of the modules.")
    return layers


def check_l1_weight(l1_weight: float) -> None:
    """Raise a ValueError unless ``l1_weight`` is a finite number >= 0."""
    if not (is_finite_number(l1_weight) and l1_weight >= 0):
        raise ValueError(f"AM-LoRA: l1_weight must be a number >= 0 and finite, got {l1_weight!r}; 0 adds no L1 term.")


def has_amlora(model: nn.Module) -> bool:
    """Whether :func:`add_amlora` is on ``model``."""
    return _STATE_ATTRIBUTE in model.__dict__


def amlora_adapters(model: nn.Module) -> list[str]:
    """The adapters AM-LoRA mixes, in task order (the last is the one that trains)."""
    return list(_state(model).adapters)


def set_amlora_l1_weight(model: nn.Module, l1_weight: float) -> nn.Module:
    """Set ``λ`` of the L1 gradient the layers add in backward (0: none); see :func:`add_amlora`.

    Raises:
        ValueError: A negative or non-numeric weight, or no AM-LoRA on the model.
    """
    state = _state(model)
    check_l1_weight(l1_weight)
    state.l1_weight = float(l1_weight)
    return model


def amlora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The selector's weights of the last forward: ``{layer name: [..., n]}`` over :func:`amlora_adapters` held by
    that layer (for ``"softmax"`` the zero LoRA's share is ``1 - sum``), with their autograd graph."""
    return dict(_state(model).latest)


def amlora_l1(model: nn.Module) -> torch.Tensor:
    """The L1 term of the last forward: ``(1 / n_layers) Σ_layers mean_positions Σ_i |g_i|`` over the task adapters
    (differentiable). Add ``λ * amlora_l1(model)`` to a loss when :func:`add_amlora` got ``l1_weight=0``.

    Raises:
        ValueError: No AM-LoRA on the model, or no forward yet.
    """
    state = _state(model)
    if not state.latest:
        raise ValueError("AM-LoRA: no forward has run since add_amlora; call the model first.")
    total = sum(weights.abs().sum(-1).mean() for weights in state.latest.values())
    return total / state.n_layers


def remove_amlora(model: nn.Module) -> nn.Module:
    """Take AM-LoRA off: the layers' gate and ``model.amlora_selector`` go; the adapters stay as they are.

    Raises:
        ValueError: No AM-LoRA on the model.
    """
    _state(model)
    for _, layer in lora_layers(model):
        remove_plan(layer, AmLoraGate)
    delattr(model, SELECTOR_NAME)
    del model.__dict__[_STATE_ATTRIBUTE]
    return model


def _state(model: nn.Module) -> _AmLoraState:
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        raise ValueError("The model has no AM-LoRA; call add_amlora(model, adapter_name) first.")
    return state

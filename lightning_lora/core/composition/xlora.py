"""X-LoRA (Buehler & Buehler 2024, https://arxiv.org/abs/2402.07148): a learned gate mixes frozen LoRA experts per
token and per layer.

Every forward of the model runs twice. The *scalings pass* (no gradients) runs the model with every expert weighted
by ``scaling_pass_value`` (default 0: the base model) and reads a hidden state; a small classifier turns it into
``scalings[..., layer, expert]``, one weight per position of the hidden state's leading dimensions (batch and
sequence), per adapted layer and per expert. The *scaled pass* then runs the model with each expert's update
multiplied by its weight at that position: ``base(x) + Σ_k s_k * global_scaling_weight * scaling_k * B_k A_k x``.
The numbers are PEFT's ``XLoraModel`` (same classifier, same dummy scalings, same top-k and softmax rules).

The classifier is a child of the model (``model.xlora_classifier``), so its parameters train, checkpoint and load
like any other trainable parameter; the experts stay frozen unless ``use_trainable_adapters``. Adapted layers reach
the gate through their ``forward_plan`` (:class:`ExpertGate`, :mod:`lightning_lora.core.layers.forward_plan`).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_lora.core.common.modules import check_takes_child
from lightning_lora.core.composition.xlora_classifier import XLoraClassifier, XLoraConfig, top_k_weights
from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.layers.forward_plan import check_free_for, install_plan, remove_plan
from lightning_lora.core.layers.layer_types import check_weighs_per_position

CLASSIFIER_NAME = "xlora_classifier"
_STATE_ATTRIBUTE = "_xlora_state"


class ExpertGate:
    """The plan the adapted layers of one X-LoRA model follow: which experts, at which layer index, with which weights.

    ``weights`` is a ``[n_experts]`` vector in the scalings pass and ``[..., n_layers, n_experts]`` (after top-k) in
    the scaled pass. It stays set after the model's forward, until the next one: activation checkpointing recomputes
    the layers during backward, and they must see the weights of the forward they belong to (PEFT's gate hooks are
    gone by then: its recomputation runs without the gate and torch raises a CheckpointError). Before the first
    forward it is None, and a gated layer refuses to run (PEFT adds the plain experts there).

    Args:
        experts: The experts' adapter names, in the classifier's order.
        layer_index: ``{layer: index}`` in ``model.named_modules()`` order.
        config: The X-LoRA config.
    """

    plan_name = "X-LoRA's gate"
    removal = "call remove_xlora(model)"
    capabilities: frozenset[str] = frozenset()  # weights per token: no merged weight computes it

    def __init__(self, experts: list[str], layer_index: dict[LoraLayer, int], config: XLoraConfig) -> None:
        self.experts, self.layer_index, self.config = experts, layer_index, config
        self.weights: Optional[torch.Tensor] = None
        self.latest: Optional[torch.Tensor] = None  # the last scalings the classifier predicted

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's tensors belong to its autograd graph: copies and pickles start without them.
        return {**self.__dict__, "weights": None, "latest": None}

    def forward(
        self,
        layer: LoraLayer,
        x: torch.Tensor,
        base_forward: Callable[..., torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """``base(x) + Σ_k w_k * global_scaling_weight * scaling_k * B_k A_k x`` with this layer's weights ``w``."""
        if layer.merged_adapters:
            raise ValueError(f"X-LoRA: {layer.merged_adapters} are merged into a gated layer; call unmerge_lora(model)")
        weights = self.weights
        if weights is None:
            raise RuntimeError(
                "X-LoRA: a gated layer ran before the gate was computed: it was called outside the forward of the "
                "model add_xlora was given (a submodule, or a LightningModule whose training_step calls self.model "
                "while X-LoRA is on the LightningModule). Call that model, or add X-LoRA to the module you call."
            )
        if weights.dim() > 1:
            weights = weights[..., self.layer_index[layer], :]
        result = base_forward(x, *args, **kwargs)
        for k, name in enumerate(self.experts):
            settings = layer.lora_settings.get(name)
            if settings is None:
                continue  # this expert does not adapt this layer
            if not settings.initialized:
                layer._raise_uninitialized(name)
            lora_A, lora_B = settings.kind.factors(layer, name)
            # One weight per position, applied to the rank-r intermediate (PEFT scales the input: same product).
            scaling = weights[..., k : k + 1] * (settings.scaling * self.config.global_scaling_weight)
            h = layer.adapter_input(x, settings.dropout, lora_A.dtype)
            update = layer.lora_output(h, lora_A, lora_B, scaling)
            result = (result + update).to(result.dtype)  # added in the wider dtype, rounded once (as PEFT's +=)
        return result


class _XLoraState:
    """What :func:`add_xlora` attached to a model; its :meth:`scalings_pass` is the model's forward pre-hook.

    A bound method (not a closure), so ``copy.deepcopy(model)`` gives the copy its own state, gate and hook.
    """

    def __init__(self, model: nn.Module, gate: ExpertGate, hidden_states: Optional[str]) -> None:
        self.model, self.gate, self.hidden_states = model, gate, hidden_states
        self.handle: Any = None

    def scalings_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the scalings pass (dummy weights, no gradients), the classifier on its hidden state, and leave the
        weights set for the scaled pass, the model's own forward."""
        gate, config = self.gate, self.gate.config
        if all(layer.adapters_disabled for layer in gate.layer_index):
            return  # disable_adapters: the base model alone, no gate to compute
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
            raise ValueError(
                "X-LoRA runs every forward twice and each pass would write the key-value cache; call the model "
                "without a cache (use_cache=False, e.g. model.generate(..., use_cache=False)), as PEFT does."
            )
        classifier = getattr(self.model, CLASSIFIER_NAME)
        reference = classifier.layers[-1].weight
        value = torch.tensor(float(config.scaling_pass_value), dtype=reference.dtype, device=reference.device)
        gate.weights = top_k_weights(config, value.expand(len(gate.experts)))
        try:
            with torch.no_grad():
                hidden = _hidden_state(self.model, self.hidden_states, args, kwargs)
        finally:
            gate.weights = None
        scalings = classifier(hidden)
        gate.latest = scalings
        gate.weights = top_k_weights(config, scalings)


def add_xlora(
    model: nn.Module, experts: list[str], config: Optional[XLoraConfig] = None, hidden_states: Optional[str] = None
) -> nn.Module:
    """Turn a model with LoRA adapters into an X-LoRA mixture of those experts.

    Adds ``model.xlora_classifier`` (trainable), freezes the experts (unless ``config.use_trainable_adapters``) and
    makes every call of ``model`` run the scalings pass (no gradients) and then the scaled pass. Each adapted layer
    that holds an expert is one "layer" of the weights (in ``model.named_modules()`` order), as in PEFT; the
    experts are the layers' only adapters from then on.

    Args:
        model: A model whose LoRA adapters (``load_adapter``, ``apply_lora``) are the experts.
        experts: The experts' adapter names, in order (the classifier's output order).
        config: The X-LoRA config (default: ``XLoraConfig()``).
        hidden_states: Qualified name of the module whose output is the hidden state the classifier reads
            (``"model.norm"``; the first element when it returns a tuple), shaped ``[..., hidden_size]`` with the
            same leading dimensions (batch, sequence) as the gated layers' inputs. None: the model is a Hugging
            Face model, called with ``output_hidden_states=True`` and read at ``hidden_states[-1]``, as PEFT does.

    Returns:
        The same ``model``.

    Raises:
        ValueError: An unknown, repeated or merged expert, an expert that is not plain LoRA (DoRA, LoHa, ...) or that
            sits on a convolution, ``top_k_lora`` above the number of experts, X-LoRA already on the model, an
            unknown ``hidden_states`` module (the message lists close names), a Hugging Face model with
            ``config.use_cache=True``, or no ``hidden_size``. Nothing is changed on error.

    Example::

        for i, path in enumerate(expert_dirs):
            load_adapter(model, path, adapter_name=f"expert{i}")
        add_xlora(model, ["expert0", "expert1"], XLoraConfig(xlora_depth=2, xlora_size=256))
        loss = model(input_ids, labels=labels).loss  # trains model.xlora_classifier
        gate = xlora_scalings(model)  # [batch, seq, n_layers, n_experts]
    """
    config = XLoraConfig() if config is None else config
    experts = list(experts)
    layers = _check(model, experts, config, hidden_states)
    check_free_for([(name, layer) for name, layer in lora_layers(model) if layer in layers], ExpertGate.plan_name)
    hidden_size = config.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden_size is None:
        raise ValueError("X-LoRA needs the hidden state's width: set XLoraConfig(hidden_size=...).")
    config = XLoraConfig(**{**config.__dict__, "hidden_size": hidden_size})
    if config.scaling_pass_value is None:
        config.scaling_pass_value = 1.0 / len(experts)
    dtype = next(iter(model.parameters())).dtype  # PEFT: the model's first parameter's
    device = layers[0].lora_A[next(name for name in experts if name in layers[0].lora_settings)].device
    classifier = XLoraClassifier(config, len(experts), len(layers)).to(device=device, dtype=dtype)
    gate = ExpertGate(experts, {layer: index for index, layer in enumerate(layers)}, config)
    if not config.use_trainable_adapters:
        for layer in layers:
            for name in experts:
                if name in layer.lora_settings:
                    for container in layer.adapter_containers(name):
                        getattr(layer, container)[name].requires_grad_(False)
    model.add_module(CLASSIFIER_NAME, classifier)
    for layer in layers:
        install_plan(layer, gate)

    state = _XLoraState(model, gate, hidden_states)
    state.handle = model.register_forward_pre_hook(state.scalings_pass, with_kwargs=True)
    model.__dict__[_STATE_ATTRIBUTE] = state
    return model


def _hidden_state(
    model: nn.Module, hidden_states: Optional[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """Run the model's own forward (no hooks of the model itself) and return the hidden state the classifier reads."""
    if hidden_states is None:
        output = model.forward(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
        return output.hidden_states[-1]
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = model.get_submodule(hidden_states).register_forward_hook(capture)
    try:
        model.forward(*args, **kwargs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"X-LoRA: the hidden-state module {hidden_states!r} did not run in the model's forward.")
    return captured[-1]


def _check(model: nn.Module, experts: list[str], config: XLoraConfig, hidden_states: Optional[str]) -> list[LoraLayer]:
    if has_xlora(model):
        raise ValueError("X-LoRA is already on this model; call remove_xlora(model) first.")
    check_takes_child(model, CLASSIFIER_NAME, "X-LoRA")
    known = adapter_names(model)
    if not experts:
        raise ValueError(f"X-LoRA needs at least one expert; the model has adapters {known}.")
    unknown = [name for name in experts if name not in known]
    if unknown:
        raise ValueError(f"X-LoRA: unknown expert(s) {unknown}; the model has adapters {known} (load_adapter first).")
    if len(set(experts)) != len(experts):
        raise ValueError(f"X-LoRA: experts {experts} name an adapter twice.")
    if config.top_k_lora is not None and config.top_k_lora > len(experts):
        raise ValueError(f"X-LoRA: top_k_lora={config.top_k_lora} but only {len(experts)} experts.")
    layers = []
    for layer_name, layer in lora_layers(model):
        held = [name for name in experts if name in layer.lora_settings]
        if not held:
            continue
        for name in held:
            kind = layer.lora_settings[name].kind
            if not kind.plain_factors(layer.lora_settings[name]):
                what = "a LoRA with a bias on B (lora_bias)" if kind.lora_factors else kind.display_name
                raise ValueError(
                    f"X-LoRA experts must be plain LoRA adapters; {name!r} is {what} on {layer_name}."
                )
        check_weighs_per_position("X-LoRA", layer_name, layer, held)
        layers.append(layer)
    if hidden_states is None:
        if getattr(getattr(model, "config", None), "output_hidden_states", None) is None:
            raise ValueError(
                "X-LoRA: hidden_states=None reads Hugging Face output_hidden_states, which this model does not have; "
                "name the module whose output is the hidden state, e.g. add_xlora(..., hidden_states='norm')."
            )
        if getattr(model.config, "use_cache", False):
            raise ValueError(
                "X-LoRA runs every forward twice, which a key-value cache would see twice; set "
                "model.config.use_cache = False first (PEFT requires the same)."
            )
    else:
        names = [name for name, _ in model.named_modules() if name]
        if hidden_states not in names:
            close = difflib.get_close_matches(hidden_states, names, n=5, cutoff=0.5)
            raise ValueError(f"X-LoRA: no module named {hidden_states!r} in the model; close names: {close}.")
    return layers


def has_xlora(model: nn.Module) -> bool:
    """Whether :func:`add_xlora` is on ``model``."""
    return _STATE_ATTRIBUTE in model.__dict__


def xlora_scalings(model: nn.Module) -> Optional[torch.Tensor]:
    """The gate values of the model's last forward: ``[..., n_layers, n_experts]`` as the classifier gave them
    (before ``top_k_lora``), with their autograd graph; None before the first forward.

    Args:
        model: The model :func:`add_xlora` was applied to.

    Raises:
        ValueError: The model has no X-LoRA.
    """
    return _state(model).gate.latest


def xlora_experts(model: nn.Module) -> list[str]:
    """The experts of an X-LoRA model, in the order of the gate values' last dimension."""
    return list(_state(model).gate.experts)


def remove_xlora(model: nn.Module) -> nn.Module:
    """Take X-LoRA off: the hooks, ``model.xlora_classifier`` and the layers' gate go; the experts stay (frozen).

    Args:
        model: The model :func:`add_xlora` was applied to.
    """
    state = _state(model)
    state.handle.remove()
    for layer in state.gate.layer_index:
        remove_plan(layer, ExpertGate)
    delattr(model, CLASSIFIER_NAME)
    del model.__dict__[_STATE_ATTRIBUTE]
    return model


def _state(model: nn.Module) -> _XLoraState:
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        raise ValueError("The model has no X-LoRA; call add_xlora(model, experts, config) first.")
    return state

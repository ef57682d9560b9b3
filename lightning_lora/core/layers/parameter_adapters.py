"""LoRA on parameters rather than layers (PEFT's ``target_parameters``): fused mixture-of-experts weights.

Mixture-of-experts blocks (transformers' Mixtral, Qwen-MoE, gpt-oss) keep their experts as one 3-D ``nn.Parameter``
per projection (``experts.gate_up_proj``: ``[experts, out, in]``) and index it in their own forward, so no
``nn.Linear`` exists to adapt. Here each chosen parameter gets a *site*, a :class:`ParameterAdapters` layer that
holds the adapters of that parameter (``<owner>.lora_parameters.<parameter>.lora_A.<adapter>``), and the owning
module's class is swapped (the same idiom as adapted layers) for one whose forward runs the original forward with
each chosen parameter replaced by ``W + delta``: gradients reach the factors through the owner's own arithmetic.

The factors are PEFT's: ``A: [r * experts, in]``, ``B: [out, r * experts]``; expert ``e`` uses rows ``e*r..e*r+r``
of ``A`` and the columns ``e, e + experts, e + 2 * experts, ...`` of ``B`` (PEFT's reshapes), so files go both ways
unchanged. A 2-D parameter ``[out, in]`` is one expert. The layout ``[experts, out, in]`` is the default; an owner
with ``is_transposed = True`` keeps ``[experts, in, out]`` (as PEFT reads it). LoRA only, with a random init, no
dropout and no ``lora_bias`` (PEFT's limits); merging writes into the parameter itself.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.config.fields import pattern_matches
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.containers import AdapterDict

SITES = "lora_parameters"  # the owner's child ModuleDict holding one site per adapted parameter


class ParameterAdapters(LoraLayer):
    """The adapters of one parameter of another module (its *owner*). Created by :func:`adapt_parameter`."""

    applies_dropout = False
    weight_is_transposed = False

    def __init__(self, owner: nn.Module, parameter_name: str, peft_path: Optional[str] = None) -> None:
        nn.Module.__init__(self)
        self.__dict__["_owner"] = owner  # not a child module: the owner holds this site
        self.parameter_name = parameter_name  # relative to the owner: "gate_up_proj", "out_proj.weight"
        self.peft_path = peft_path  # set for a module PEFT adapts as a whole (nn.MultiheadAttention)
        self._init_lora_state()

    @property
    def holder(self) -> nn.Module:
        """The module whose ``_parameters`` hold the adapted parameter (the owner or one of its children)."""
        return self._owner.get_submodule(self.parameter_name.rpartition(".")[0])

    @property
    def weight(self) -> torch.Tensor:
        """The adapted parameter."""
        return self.holder._parameters[self.parameter_name.rpartition(".")[2]]

    def _geometry(self) -> tuple[int, int, int, bool]:
        """``(experts, in, out, experts_first_in)``: ``experts_first_in`` for the ``[experts, in, out]`` layout."""
        shape = self.weight.shape
        if len(shape) == 2:
            return 1, shape[1], shape[0], False
        if getattr(self._owner, "is_transposed", False):
            return shape[0], shape[1], shape[2], True
        return shape[0], shape[2], shape[1], False

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        _, in_features, out_features, _ = self._geometry()
        return in_features, out_features, ()

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        experts, in_features, out_features, _ = self._geometry()
        return (r * experts, in_features), (out_features, r * experts)

    def low_rank_product(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        experts, in_features, out_features, experts_first_in = self._geometry()
        if self.weight.dim() == 2:
            return lora_B @ lora_A
        per_expert_A = lora_A.reshape(experts, -1, in_features)  # [experts, r, in]
        per_expert_B = lora_B.reshape(out_features, -1, experts)  # [out, r, experts]
        pattern = "ore,eri->eio" if experts_first_in else "ore,eri->eoi"
        return torch.einsum(pattern, per_expert_B, per_expert_A)

    def update(self) -> Optional[torch.Tensor]:
        """The sum of the active, unmerged adapters' deltas (differentiable), or None."""
        if self.adapters_disabled:
            return None
        total = None
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            if not self.lora_settings[name].initialized:
                self._raise_uninitialized(name)
            delta = self.delta_weight(name)
            total = delta if total is None else total + delta
        return total

    def owner_name(self, layer_name: str) -> str:
        """The owner's module name, from this site's (``<owner>.lora_parameters.<key>``)."""
        return layer_name.removesuffix(f"{SITES}.{_site_key(self.parameter_name)}").removesuffix(".")

    def weight_key(self, layer_name: str) -> str:
        return ".".join(part for part in (self.owner_name(layer_name), self.parameter_name) if part)

    def peft_name(self, layer_name: str) -> str:
        owner_name = self.owner_name(layer_name)
        if self.peft_path is not None:
            return ".".join(part for part in (owner_name, self.peft_path) if part)
        return peft_site_name(owner_name, self._owner, self.parameter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.parameter_name}'s adapters act through their owner's forward; call the owner.")

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}({s.kind.describe(s)})" for name, s in self.lora_settings.items())
        return f"parameter={self.parameter_name}, shape={list(self.weight.shape)}, adapters=[{adapters}]"

    def __reduce_ex__(self, protocol: int) -> Any:
        return object.__reduce_ex__(self, protocol)


ParameterAdapters.layer_type = ParameterAdapters
ParameterAdapters.base_class = nn.Module


class ParameterOwner(nn.Module):
    """Put in front of an owner's class: its forward sees each adapted parameter as ``W + delta``."""

    base_class: type[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        updates = [(site, update) for site in self._modules[SITES].values() if (update := site.update()) is not None]
        if not updates:
            return super().forward(*args, **kwargs)
        swapped = []
        try:
            for site, update in updates:
                holder, leaf = site.holder, site.parameter_name.rpartition(".")[2]
                original = holder._parameters[leaf]
                swapped.append((holder, leaf, original))
                holder._parameters[leaf] = original + update.to(original.dtype)
            return super().forward(*args, **kwargs)
        finally:
            for holder, leaf, original in swapped:
                holder._parameters[leaf] = original

    def __reduce_ex__(self, protocol: int) -> Any:
        return _rebuild_owner, (self.base_class,), self.__dict__.copy()


def _rebuild_owner(base_class: type[nn.Module]) -> nn.Module:
    return object.__new__(owner_class(base_class))


@functools.cache
def owner_class(base_class: type[nn.Module]) -> type[nn.Module]:
    """The owner subclass of ``base_class`` whose forward applies its parameters' adapters."""
    return type(f"LoraParameters{base_class.__name__}", (ParameterOwner, base_class),
                {"base_class": base_class, "__module__": __name__})  # fmt: skip


def _site_key(parameter_name: str) -> str:
    return parameter_name.replace(".", "_")  # ModuleDict keys hold no dots


def site_name(owner_name: str, parameter_name: str) -> str:
    """The module name of a parameter's site (the name adapter code reports for it)."""
    key = _site_key(parameter_name)
    return f"{owner_name}.{SITES}.{key}" if owner_name else f"{SITES}.{key}"


def adapt_parameter(owner: nn.Module, parameter_name: str, peft_path: Optional[str] = None) -> ParameterAdapters:
    """The site of ``owner.<parameter_name>`` (a dotted path for a child's parameter), made (and the owner's class
    swapped) on first use; ``peft_path``: where PEFT keeps its adapters, relative to the owner, if not nested."""
    if not isinstance(owner, ParameterOwner):
        owner.__class__ = owner_class(type(owner))
        owner._modules[SITES] = nn.ModuleDict()
    sites = owner._modules[SITES]
    if _site_key(parameter_name) not in sites:
        sites[_site_key(parameter_name)] = ParameterAdapters(owner, parameter_name, peft_path)
    return sites[_site_key(parameter_name)]


def release_parameter(site: ParameterAdapters) -> None:
    """Detach a site without adapters from its owner; the owner gets its own class back with its last site."""
    owner = site._owner
    sites = owner._modules[SITES]
    del sites[_site_key(site.parameter_name)]
    if not len(sites):
        del owner._modules[SITES]
        owner.__class__ = owner.base_class


def peft_site_name(owner_name: str, owner: nn.Module, parameter_name: str) -> str:
    """PEFT's module name for the adapters of one parameter: PEFT nests one wrapper per adapted parameter of a
    module, the first (in the module's order) innermost, so it sits under ``base_layer`` once per later one."""
    adapted = [name for name, _ in owner.named_parameters(recurse=False) if name in owner._modules[SITES]]
    depth = len(adapted) - 1 - adapted.index(parameter_name)
    return ".".join([owner_name, *["base_layer"] * depth]) if owner_name else ".".join(["base_layer"] * depth)


def whole_module_sites(name: str, module: nn.Module, config: AdapterConfig) -> list[tuple[str, str]]:
    """``(parameter path, PEFT path)`` of the sites that adapt ``module`` as a whole, for a layer its forward never
    reaches: ``nn.MultiheadAttention`` computes with ``in_proj_weight`` and ``out_proj.weight`` directly, so LoRA
    updates both weights (PEFT's layout: ``<name>.lora_A`` for ``in_proj``, ``<name>.base_layer.out_proj.lora_A``).
    Empty for other modules.

    Raises:
        ValueError: Separate q/k/v weights. (Options PEFT refuses there are the kind's to name: ``apply_lora`` asks
            ``parameter_site_refusals``.)
    """
    if not isinstance(module, nn.MultiheadAttention):
        return []
    if not module._qkv_same_embed_dim:
        raise ValueError(f"{name} (nn.MultiheadAttention) takes plain LoRA on its packed in_proj and out_proj, as in "
                         "PEFT; separate q/k/v weights (kdim/vdim differ from embed_dim) have none: leave it out with "
                         "exclude_modules.")  # fmt: skip
    return [("in_proj_weight", ""), ("out_proj.weight", "base_layer.out_proj")]


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules as PEFT sees them: the sites and adapter containers added here left out.

    Args:
        model: Any module.
    """
    return [(name, module) for name, module in model.named_modules()
            if not isinstance(module, (AdapterDict, ParameterAdapters)) and name.rpartition(".")[2] != SITES]


def find_parameter_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, str]]:
    """``(owner name, owner, parameter name)`` of every parameter ``config.target_parameters`` names, with PEFT's
    rule: ``<module>.<parameter>`` equals an entry or ends with ``"." + entry``.

    Raises:
        ValueError: An entry matches no parameter, a parameter that is not 2-D or 3-D, or a rank or alpha pattern
            for a parameter. (Options PEFT refuses on parameters are the kind's to name: ``apply_lora`` asks
            ``parameter_site_refusals``.)
    """
    wanted = config.target_parameters
    if not wanted:
        return []
    found, matched = [], set()
    for owner_name, owner in base_modules(model):
        for parameter_name, parameter in owner.named_parameters(recurse=False):
            key = f"{owner_name}.{parameter_name}" if owner_name else parameter_name
            entries = [entry for entry in wanted if key == entry or key.endswith("." + entry)]
            if not entries:
                continue
            matched.update(entries)
            if not owner_name:
                raise ValueError(f"target_parameters names {key!r} of the model itself; name a submodule's parameter.")
            if parameter.dim() not in (2, 3):
                raise ValueError(f"target_parameters names {key} of shape {list(parameter.shape)}; LoRA adapts 2-D "
                                 "weights [out, in] and 3-D expert stacks [experts, out, in].")  # fmt: skip
            found.append((owner_name, owner, parameter_name))
    missing = [entry for entry in wanted if entry not in matched]
    if missing:
        raise ValueError(f"target_parameters entries {missing} match no parameter of the model (PEFT's rule: "
                         "'<module>.<parameter>' ends with the entry, e.g. 'experts.gate_up_proj').")  # fmt: skip
    patterned = [f"{o}.{p}" for o, _, p in found for patterns in (config.rank_pattern, config.alpha_pattern)
                 if any(pattern_matches(name, key) for key in patterns for name in (f"{o}.{p}", site_name(o, p)))]
    if patterned:
        raise ValueError(f"rank_pattern/alpha_pattern match the target parameters {patterned[:3]}; parameters take "
                         "the adapter's r and alpha. Narrow the patterns to layers.")  # fmt: skip
    return found


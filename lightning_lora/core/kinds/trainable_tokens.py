"""Trainable tokens (PEFT's ``trainable_token_indices``): train chosen rows of an embedding, such as new special
tokens, and nothing else of it.

A LoRA adapter with ``LoraConfig(trainable_token_indices=...)`` holds, on each chosen ``nn.Embedding``, the new
values of those rows as ``layer.trainable_tokens_delta[adapter]`` (``[len(indices), dim]``, PEFT's name, though it
holds the rows themselves, not a difference), starting as the base rows. Looking up a chosen token returns its row
from there; every other token the base row. Merging writes the rows into the base table and keeps the old ones to
unmerge. The indices live in the config (``settings.token_indices`` on the layer), as in PEFT's files.

These layers belong to the LoRA adapter but are of this kind: adapter-wide code asks :func:`token_layer` to tell
them from the adapter's LoRA layers (PEFT writes them as ``<embedding>.token_adapter.trainable_tokens_delta`` and
lists them in ``trainable_token_indices``, not ``target_modules``).

An ``nn.Linear`` output head tied to the embedding (GPT-2's ``lm_head``) uses the same rows, as PEFT ties it: its
outputs for the chosen tokens come from them. It holds no tensor of its own (``settings.token_source`` is the
embedding layer), and the files hold the rows once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from torch import nn

from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.kinds.base import AdapterKind, AdapterTensor
from lightning_lora.core.layers.layer_types import LinearAdapters

if TYPE_CHECKING:
    from lightning_lora.core.layers.adapted_layer import AdapterSettings, LoraLayer

TOKENS_CONTAINER = "trainable_tokens_delta"


class TrainableTokensKind(AdapterKind):
    """New values for chosen rows of an embedding table."""

    name = "trainable_tokens"
    display_name = "trainable tokens"
    peft_type = "LORA"  # never a file of its own: it rides in a LoRA adapter's file
    containers: ClassVar[tuple[str, ...]] = (TOKENS_CONTAINER,)
    config_class = LoraConfig

    def tensors(self, layer: LoraLayer, settings: AdapterSettings) -> list[AdapterTensor]:
        if settings.token_source is not None:
            return []  # a tied head reads the embedding's rows
        return [AdapterTensor(TOKENS_CONTAINER, (len(settings.token_indices), layer.embedding_dim))]

    def scaling(self, settings: AdapterSettings) -> float:
        return 1.0

    def describe(self, settings: AdapterSettings) -> str:
        return f"trainable tokens {list(settings.token_indices)}"

    def reads_base_weight(self, config: AdapterConfig) -> bool:
        return True  # the rows start as the base rows

    def initialize(self, layer: LoraLayer, adapter_name: str) -> None:
        if layer.lora_settings[adapter_name].token_source is None:
            rows = layer.weight[_indices(layer, adapter_name, layer.weight.device)]
            layer.trainable_tokens_delta[adapter_name].copy_(rows)

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        indices, rows = _indices(layer, adapter_name, x.device), _rows(layer, adapter_name)
        if isinstance(layer, LinearAdapters):  # a tied head: the chosen tokens' logits from the new rows
            bias = None if layer.bias is None else layer.bias[indices]
            columns = torch.nn.functional.linear(x.to(rows.dtype), rows, bias)
            return result.index_copy(-1, indices, columns.to(result.dtype))
        ordered, order = indices.sort()
        position = torch.searchsorted(ordered, x).clamp_(max=len(ordered) - 1)
        chosen = ordered[position] == x
        looked_up = layer._embed_scaled(rows[order[position]])
        return torch.where(chosen.unsqueeze(-1), looked_up.to(result.dtype), result)

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        weight = layer.weight.detach()
        return self.merged_weight(layer, adapter_name, weight, {}) - weight

    def merged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        indices = _indices(layer, adapter_name, weight.device)
        record[adapter_name] = weight[indices].clone()
        return weight.index_copy(0, indices, _rows(layer, adapter_name).detach().to(weight.dtype))

    def unmerged_weight(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return weight.index_copy(0, _indices(layer, adapter_name, weight.device), record.pop(adapter_name))

    def peft_tensor_leaf(self, layer: LoraLayer, container: str) -> str:
        return f"token_adapter.{container}"

    def peft_config_fields(self, config: AdapterConfig) -> dict[str, Any]:
        return {}

    def fold_for_vllm(
        self, tensors: dict[str, torch.Tensor], r: int, scaling: float, rank: int, new_scaling: float
    ) -> dict[str, torch.Tensor]:
        raise ValueError(
            "A vLLM adapter holds only lora_A/lora_B: this adapter trains embedding rows (trainable_token_indices). "
            "Export with format='peft', or serve the merged model (save_merged_model)."
        )


TRAINABLE_TOKENS = TrainableTokensKind()


def token_layer(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether ``layer`` holds trainable token rows of ``adapter_name`` (rather than one of its LoRA layers)."""
    settings = layer.lora_settings.get(adapter_name)
    return settings is not None and settings.kind is TRAINABLE_TOKENS


def _rows(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """The chosen rows' values: the layer's own, or those of the embedding a tied head reads."""
    source = layer.lora_settings[adapter_name].token_source
    return (layer if source is None else source).trainable_tokens_delta[adapter_name]


def _indices(layer: LoraLayer, adapter_name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(layer.lora_settings[adapter_name].token_indices, dtype=torch.long, device=device)


def find_token_layers(
    model: nn.Module, config: AdapterConfig
) -> list[tuple[str, nn.Module, tuple[int, ...], Optional[str]]]:
    """The embeddings whose rows ``config.trainable_token_indices`` trains, each with its indices, followed by the
    ``nn.Linear`` heads tied to them, each with the name of its embedding (None for the embeddings themselves).

    A list of indices names the model's input embedding (``get_input_embeddings()``, else the module called
    ``embed_tokens``); a dict maps embedding names (dotted suffixes, PEFT's rule) to indices.

    Raises:
        ValueError: A name that matches no embedding, an index outside the table, a table tied to something other
            than an ``nn.Linear`` head.
    """
    chosen = getattr(config, "trainable_token_indices", None)
    if chosen is None:
        return []
    modules = dict(model.named_modules())
    if isinstance(chosen, dict):
        wanted = chosen
    else:
        get_input = getattr(model, "get_input_embeddings", None)
        embedding = get_input() if callable(get_input) else None
        names = [n for n, m in modules.items() if m is embedding] or [n for n in modules if n.endswith("embed_tokens")]
        if len(names) != 1:
            raise ValueError(
                "trainable_token_indices is a list, so it trains the input embedding, but the model has "
                f"{'several' if names else 'no'} such layer ({names or 'no get_input_embeddings, no embed_tokens'}). "
                "Name it: trainable_token_indices={'<embedding name>': [...]}."
            )
        wanted = {names[0]: chosen}
    found, heads = [], []
    for entry, indices in wanted.items():
        matches = [(n, m) for n, m in modules.items() if n == entry or n.endswith("." + entry)]
        if len(matches) != 1 or not isinstance(matches[0][1], nn.Embedding):
            raise ValueError(
                f"trainable_token_indices names {entry!r}, which matches {[n for n, _ in matches] or 'no module'}; "
                "it must name exactly one nn.Embedding."
            )
        name, module = matches[0]
        outside = [i for i in indices if i >= module.num_embeddings]
        if outside:
            raise ValueError(f"trainable_token_indices for {name}: {outside} are beyond its {module.num_embeddings} "
                             "rows; resize the embeddings for new tokens first (resize_token_embeddings).")  # fmt: skip
        sharing = [(n, m) for n, m in modules.items() if n != name and getattr(m, "weight", None) is module.weight]
        if any(not isinstance(m, nn.Linear) for _, m in sharing):
            raise ValueError(
                f"{name} shares its weight with {[n for n, _ in sharing]}: trainable_token_indices ties only "
                "nn.Linear output heads to the embedding's rows. Untie the others, or train the whole embedding with "
                "modules_to_save."
            )
        found.append((name, module, tuple(indices), None))
        heads += [(n, m, tuple(indices), name) for n, m in sharing if n not in wanted]
    return found + heads

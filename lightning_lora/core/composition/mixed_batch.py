"""Mixed-adapter batches: one forward in which every sample uses its own adapter, or none.

For serving many fine-tunes of one base model: requests for different adapters share one batch and one pass of the
base weights. Inside :func:`mixed_adapter_batch` every adapted layer computes the base output for the whole batch
once, then, for each group of samples that share an adapter, that adapter's contribution for those rows only. The
samples are grouped once per context (a slice for a contiguous group, an index tensor otherwise), never looped over
one by one. Each row equals what the model computes for that sample alone with only its adapter active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lora.core.layers.adapted_layer import LoraLayer, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names as model_adapter_names
from lightning_lora.core.layers.forward_plan import check_free_for, install_plan, remove_plan
from lightning_lora.core.layers.parameter_adapters import ParameterAdapters

#: The name that stands for "no adapter: the base model alone" in a mixed batch (PEFT's placeholder).
BASE_MODEL = "__base__"

Rows = slice | torch.Tensor


class MixedBatch:
    """Which rows of the batch use which adapter: the plan every adapted layer of one model follows.

    Built by :func:`mixed_adapter_batch`; layers call :meth:`forward` from ``LoraLayer.forward`` while it is set.

    Args:
        adapter_names: One adapter name per sample of the batch's first dimension (``"__base__"``: no adapter).
        layer_names: ``{layer: qualified name}``, for messages.
    """

    plan_name = "a mixed-adapter batch"
    removal = "leave its mixed_adapter_batch block (one mixed batch at a time)"
    capabilities: frozenset[str] = frozenset()

    def __init__(self, adapter_names: Sequence[str], layer_names: dict[nn.Module, str]) -> None:
        self.size = len(adapter_names)
        self.layer_names = layer_names
        positions: dict[str, list[int]] = {}
        for index, name in enumerate(adapter_names):
            positions.setdefault(name, []).append(index)
        self.groups = [(name, rows) for name, rows in positions.items() if name != BASE_MODEL]
        self._rows: dict[torch.device, list[tuple[str, Rows]]] = {}

    def rows(self, device: torch.device) -> list[tuple[str, Rows]]:
        """``(adapter, rows)`` per group: a slice for a contiguous run of samples, else an index tensor on
        ``device`` (made once per device)."""
        if device not in self._rows:
            self._rows[device] = [(name, _selector(rows, device)) for name, rows in self.groups]
        return self._rows[device]

    def forward(
        self,
        layer: LoraLayer,
        x: torch.Tensor,
        base_forward: Callable[..., torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The output of ``layer`` for a mixed batch ``x``: base output, then each group's adapter on its rows.

        Args:
            layer: The adapted layer.
            x: Its input, samples along the first dimension.
            base_forward: The base layer's own forward.
            args: Further positional arguments of the call.
            kwargs: Keyword arguments of the call.

        Raises:
            ValueError: The first dimension of ``x`` is not the number of adapter names, or an adapter was merged
                inside the context.
        """
        if layer.merged_adapters:
            raise ValueError(
                f"Mixed adapter batch: {layer.merged_adapters} merged into "
                f"{self.layer_names.get(layer, type(layer).__name__)} inside the context; call unmerge_lora(model)."
            )
        if x.dim() == 0 or x.shape[0] != self.size:
            got = "a scalar input" if x.dim() == 0 else f"a batch of {x.shape[0]} samples (first dimension)"
            raise ValueError(
                f"Mixed adapter batch: {self.layer_names.get(layer, type(layer).__name__)} received {got}, "
                f"but {self.size} adapter names were given. Pass exactly one adapter name per "
                "sample of the batch's first dimension (with beam search or sampled sequences, repeat each name "
                "once per sequence)."
            )
        result = base_forward(x, *args, **kwargs)
        # With autograd recording, write into a copy: the base output may be saved for the backward pass.
        out = result.clone() if torch.is_grad_enabled() else result
        for name, rows in self.rows(x.device):
            settings = layer.lora_settings.get(name)
            if settings is None:
                continue  # the adapter does not adapt this layer: the base output stands, as when run alone
            if not settings.initialized:
                layer._raise_uninitialized(name)
            x_rows = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            if settings.kind.action == "transform":  # OFT: the base operation on transformed inputs
                new_rows = settings.kind.transformed_forward(
                    layer, name, x_rows, lambda inputs: base_forward(inputs, *args, **kwargs)
                )
            else:  # adds to (LoRA, LoHa, ...) or rescales (DoRA) the base output of these rows
                result_rows = result[rows] if isinstance(rows, slice) else result.index_select(0, rows)
                new_rows = settings.kind.forward(layer, name, x_rows, result_rows)
            if isinstance(rows, slice):
                out[rows] = new_rows
            else:
                out.index_copy_(0, rows, new_rows.to(out.dtype))
        return out


def _selector(rows: list[int], device: torch.device) -> Rows:
    start, stop = rows[0], rows[-1] + 1
    if stop - start == len(rows):
        return slice(start, stop)
    return torch.tensor(rows, dtype=torch.long, device=device)


@contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Context manager: inside it, sample ``i`` of every forward of ``model`` uses adapter ``adapter_names[i]``.

    ``"__base__"`` (:data:`BASE_MODEL`) gives a sample the base model alone. Each sample gets exactly its adapter,
    whichever adapters are active, so its output equals running it alone after
    ``set_active_adapters(model, [name])``. Every adapter kind works: additive ones (LoRA, rsLoRA, LoHa, LoKr,
    VeRA, AdaLoRA) add their update to their rows of the base output, DoRA rescales its rows, OFT reruns the base
    operation on its rows' rotated inputs (that costs one more base pass for those rows). State that is not an
    adapter (``modules_to_save``, trained biases) is one copy and applies to every sample, as it does when run
    alone. ``disable_adapters`` takes precedence: inside it the whole batch is the base model.
    The context covers every forward inside it (``generate`` included, as long as the layers see the samples
    along the first dimension). Training works too: each adapter gets gradients from its own samples only (the
    sum of what each sample alone would give); dropout draws per group.

    Args:
        model: A model with adapters (or any module containing one, e.g. a LightningModule).
        adapter_names: One adapter name per sample of the batch's first dimension, in order.

    Raises:
        TypeError: ``adapter_names`` is a single string, or holds something other than strings.
        ValueError: An unknown adapter name (the message lists the model's adapters), no names or no adapters,
            merged adapters (call ``unmerge_lora`` first), or a mixed batch already set on the model. Inside the
            context, a layer whose input's first dimension is not ``len(adapter_names)``. A refused call leaves
            the model as it was.

    Example::

        with torch.no_grad(), mixed_adapter_batch(model, ["task_a", "task_b", "__base__", "task_a"]):
            logits = model(input_ids).logits  # input_ids: [4, length]

        # In Lightning, the batch carries the names (DataLoader's default collate makes a list of strings):
        def predict_step(self, batch, batch_idx):
            with mixed_adapter_batch(self.model, batch["adapter_names"]):
                return self.model(batch["input_ids"]).logits
    """
    names = _checked_names(model, adapter_names)
    layers = lora_layers(model)
    merged = [name for name, layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Mixed adapter batch: adapters are merged into {merged[:3]}{'...' if len(merged) > 3 else ''}, so the "
            "base weights no longer hold the base model. Call unmerge_lora(model) first."
        )
    on_parameters = [name for name, layer in layers if isinstance(layer, ParameterAdapters)]
    if on_parameters:
        raise ValueError(
            f"Mixed adapter batch: {on_parameters[:3]} adapt parameters (target_parameters), whose update changes the "
            "weight for the whole batch, so samples cannot use different adapters there. Serve such adapters one at "
            "a time (set_active_adapters)."
        )
    check_free_for(layers, MixedBatch.plan_name)
    plan = MixedBatch(names, {layer: name for name, layer in layers})
    for _, layer in layers:
        install_plan(layer, plan)
    try:
        yield model
    finally:
        for _, layer in layers:
            remove_plan(layer, MixedBatch)


def _checked_names(model: nn.Module, adapter_names: Sequence[str]) -> list[str]:
    if isinstance(adapter_names, str):
        raise TypeError(
            f"adapter_names must hold one name per sample, got the single string {adapter_names!r}; pass a list "
            f"such as [{adapter_names!r}, ...]."
        )
    names = list(adapter_names)
    wrong = [name for name in names if not isinstance(name, str)]
    if wrong:
        raise TypeError(
            f"adapter_names must be strings, got {wrong[:3]}; use {BASE_MODEL!r} for a sample without an adapter."
        )
    known = model_adapter_names(model)
    if not known:
        raise ValueError("Mixed adapter batch: the model has no adapters; add them with apply_lora or load_adapter.")
    if not names:
        raise ValueError("Mixed adapter batch: adapter_names is empty; give one name per sample of the batch.")
    unknown = sorted({name for name in names if name != BASE_MODEL and name not in known})
    if unknown:
        raise ValueError(
            f"Mixed adapter batch: unknown adapter name(s) {unknown}; the model has {known} "
            f"(use {BASE_MODEL!r} for the base model alone)."
        )
    return names

"""Merged-model export: the model with its adapters folded in, as a plain state dict in safetensors files.

The files hold exactly the keys of the original model class (adapter tensors left out), so the export loads with
``load_state_dict(..., strict=True)`` into a model built without lightning_lora, or with Hugging Face
``from_pretrained`` (a ``config.json`` is written for Hugging Face models). Large models are split into shards
``model-00001-of-0000N.safetensors`` with a ``model.safetensors.index.json``, as Hugging Face does.

The live model is not changed: merged weights are computed one shard at a time from copies.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from lightning_lora.core.common.base_weights import dense_weight, is_plain_weight
from lightning_lora.core.common.distributed import full_tensor, uncompiled
from lightning_lora.core.common.safe_files import (
    PathLike,
    is_writer,
    publish,
    read_safetensors,
    staging_directory,
    write_safetensors,
)
from lightning_lora.core.layers.adapted_layer import LoraLayer
from lightning_lora.core.layers.containers import AdapterDict, SharedTensors
from lightning_lora.core.quantization.quantized_weights import dense_reference
from lightning_lora.core.surgery.merge import _merge_plan, merged_bias

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TIED_KEYS_METADATA = "lightning_lora_tied_keys"  # {alias key: key holding the tensor}, JSON in each file's metadata
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


@dataclass
class _Source:
    """Where one written tensor comes from: ``produce()`` gives its value; ``reference`` has its shape and dtype."""

    reference: torch.Tensor
    produce: Callable[[], torch.Tensor]


def save_merged_model(
    model: nn.Module,
    directory: PathLike,
    *,
    adapter_names: Optional[list[str]] = None,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Optional[torch.dtype] = None,
    safe: bool = True,
    dequantize: bool = False,
) -> Path:
    """Write the model with adapters merged, without changing the live model.

    Tied weights (GPT-2's ``lm_head`` and ``wte``) are stored once and restored by :func:`load_merged_state_dict`
    and by ``from_pretrained``. When an adapter sits on one of the tied modules, merging gives them different
    weights: both are written, the tie is dropped from the written ``config.json`` and a warning says so.

    Args:
        model: A model with LoRA adapters.
        directory: Folder to write (created if missing; other files in it are kept, earlier weight files replaced).
        adapter_names: Adapters to merge; default: the active ones. Others are left out.
        max_shard_size: Largest shard in bytes, or a string such as ``"5GB"`` or ``"500MiB"``; a model that fits
            in one shard is written as one ``model.safetensors``.
        dtype: Cast floating tensors to this dtype (``torch.bfloat16`` for serving); default: keep.
        safe: Refuse to write merged weights with NaN/Inf (nothing is written then).
        dequantize: Write bitsandbytes-quantised layers dequantised (the weights the adapters were trained on),
            without changing the model; without it a quantised base is refused. The way to export from an
            FSDP2-sharded 4-bit model, whose weights :func:`dequantize_model` cannot swap.

    Returns:
        The directory, as a ``Path``.

    Raises:
        ValueError: No adapters, adapters that cannot be merged together, quantised base weights (without
            ``dequantize``), non-finite merged weights, an invalid ``max_shard_size`` or a ``dtype`` that is not a
            floating dtype, a ``directory`` that cannot be written. Nothing is written then.
    """
    model = uncompiled(model)
    limit = parse_size(max_shard_size)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"dtype must be a floating torch.dtype (torch.bfloat16 for serving) or None to keep the weights' own, got "
            f"{dtype!r}; casting weights to it would destroy them."
        )
    quantised = {name: m for name, m in model.named_modules() if _has_tensor_weight(m) and not is_plain_weight(m)}
    if quantised and not dequantize:
        raise ValueError(
            f"{list(quantised)[:3]} hold quantised weights; a merged export needs plain floating weights. Pass "
            "dequantize=True (or call dequantize_model(model) first) to write the dequantised weights the adapters "
            "were trained on, or load the base unquantised (e.g. in bfloat16), load_adapter onto it, then export."
        )
    sources, aliases, untied = _merged_sources(model, adapter_names, safe, quantised)
    for keys in untied:
        warnings.warn(
            f"An adapter changes {keys[0]}, which is tied to {keys[1:]}; the merged weights differ, so the export "
            "writes each one and unties them (config.json gets tie_word_embeddings=false). A model class that ties "
            "them again would load them wrongly.",
            stacklevel=2,
        )
    directory = Path(directory)
    if not is_writer():
        for source in sources.values():
            source.produce()  # gathers of sharded tensors are collectives: every rank takes part
        return directory
    shards = _shard(sources, limit, dtype)
    metadata = {TIED_KEYS_METADATA: json.dumps(aliases)} if aliases else {}
    with staging_directory(directory) as staging:
        weight_map, total_size = {}, 0
        for index, keys in enumerate(shards, start=1):
            file_name = SINGLE_FILE_NAME if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = {key: _cast(sources[key].produce(), dtype) for key in keys}
            write_safetensors(staging / file_name, tensors, metadata)
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(keys, file_name))
            del tensors
        if len(shards) > 1:
            index_content = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (staging / INDEX_NAME).write_text(json.dumps(index_content, indent=2) + "\n")
        _write_hf_config(model, staging, untie=bool(untied))
        old_shards = [p.name for p in directory.glob("model-*.safetensors") if _SHARD_NAME.fullmatch(p.name)]
        stale = [SINGLE_FILE_NAME, INDEX_NAME, *old_shards]
        entry = INDEX_NAME if len(shards) > 1 else SINGLE_FILE_NAME
        publish(staging, directory, entry_file=entry, stale=[p for p in stale if p != entry])
    return directory


def _has_tensor_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def _merged_sources(
    model: nn.Module, adapter_names: Optional[list[str]], safe: bool, quantised: dict[str, nn.Module]
) -> tuple[dict[str, _Source], dict[str, str], list[list[str]]]:
    """The source of every written tensor, the tied keys stored once (``{alias: key}``) and the ties that an adapter
    breaks (each as a list of keys, the adapted one first). ``quantised`` layers are written dequantised."""
    plan = _merge_plan(model, adapter_names)
    merged = {layer.weight_key(name): (name, layer, pending) for name, layer, pending in plan}
    adapter_prefixes = tuple(  # the layers' adapter tensors and tensors held once per model (VB-LoRA's bank)
        f"{name}.{child}." if name else f"{child}."
        for name, owner in model.named_modules()
        for child, module in owner.named_children()
        if isinstance(module, (AdapterDict, SharedTensors))
    )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(adapter_prefixes)}
    sources = {
        key: _Source(value, _merged_weight_source(*merged[key], safe) if key in merged else _gathered(value))
        for key, value in state.items()
    }
    for name, module in quantised.items():
        for key in _extra_state_keys(state, name, module):
            del sources[key]
        key = f"{name}.weight" if name else "weight"
        produce = sources[key].produce if key in merged else _dequantized(module)
        sources[key] = _Source(dense_reference(module), produce)
    for name, layer, pending in plan:
        bias_key = f"{name}.bias" if name else "bias"
        if bias_key in sources and merged_bias(layer, pending) is not None:  # LoRA's lora_bias
            sources[bias_key] = _Source(state[bias_key], _merged_bias_source(name, layer, pending, safe))
    aliases, untied = {}, []
    for keys in _tied_groups(state):
        if any(key in merged for key in keys):
            untied.append([k for k in keys if k in merged] + [k for k in keys if k not in merged])
        else:
            aliases.update(dict.fromkeys(keys[1:], keys[0]))
    for alias in aliases:
        del sources[alias]
    return sources, aliases, untied


def _gathered(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: full_tensor(value)


def _dequantized(module: nn.Module) -> Callable[[], torch.Tensor]:
    return lambda: full_tensor(dense_weight(module))


def _extra_state_keys(state: dict[str, torch.Tensor], name: str, module: nn.Module) -> list[str]:
    """Keys that a layer's own ``_save_to_state_dict`` adds beside its parameters, buffers and children
    (bitsandbytes' quantisation state: ``weight.absmax``, ``SCB``, ...)."""
    prefix = f"{name}." if name else ""
    own = {*module._parameters, *module._buffers}
    return [
        key
        for key in state
        if key.startswith(prefix)
        and key[len(prefix):] not in own
        and key[len(prefix):].split(".")[0] not in module._modules
    ]


def _merged_weight_source(name: str, layer: LoraLayer, pending: list[str], safe: bool) -> Callable[[], torch.Tensor]:
    def merged_weight() -> torch.Tensor:
        weight = dense_weight(layer)
        for adapter in pending:
            weight = layer.lora_settings[adapter].kind.merged_weight(layer, adapter, weight, {})
        weight = full_tensor(weight)
        if safe and not torch.isfinite(weight).all():
            raise ValueError(
                f"Merging {pending} into {name or 'the model'} gives NaN/Inf weights; nothing was written. The "
                "adapter is broken (diverged training?): check its tensors and learning rate."
            )
        return weight

    return merged_weight


def _merged_bias_source(name: str, layer: LoraLayer, pending: list[str], safe: bool) -> Callable[[], torch.Tensor]:
    def bias() -> torch.Tensor:
        value = full_tensor(merged_bias(layer, pending))
        if safe and not torch.isfinite(value).all():
            raise ValueError(f"Merging {pending} into the bias of {name or 'the model'} gives NaN/Inf; nothing was "
                             "written. The adapter is broken (diverged training?).")  # fmt: skip
        return value

    return bias


def _tied_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Keys whose tensors are the same memory (tied parameters), in state-dict order."""
    from torch.distributed.tensor import DTensor

    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.numel() and not local.is_meta:
            identity = (local.device, local.data_ptr(), local.dtype, tuple(local.shape), local.stride())
            groups.setdefault(identity, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _shard(sources: dict[str, _Source], limit: int, dtype: Optional[torch.dtype]) -> list[list[str]]:
    """Keys per shard, in state-dict order, each shard at most ``limit`` bytes unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, source in sources.items():
        reference = source.reference
        item_dtype = dtype if dtype is not None and reference.is_floating_point() else reference.dtype
        nbytes = reference.numel() * item_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_hf_config(model: nn.Module, staging: Path, untie: bool) -> None:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_file", None)):
        return
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    if untie and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    config.to_json_file(str(staging / "config.json"))


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10^9) or ``"500MiB"`` (2^20).

    Raises:
        ValueError: Not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", size.upper())
        if match and int(float(match.group(1)) * _SIZE_UNITS[match.group(2)]) >= 1:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}.")


def load_merged_state_dict(directory: PathLike) -> dict[str, torch.Tensor]:
    """Read a merged export (one file or shards with an index) into a state dict, tied keys restored.

    Args:
        directory: Folder written by :func:`save_merged_model`.

    Example::

        model = MyModel(config)
        model.load_state_dict(load_merged_state_dict("merged/"), strict=True)

    Raises:
        FileNotFoundError: No export in ``directory``, or a shard listed in the index is missing.
        ValueError: A corrupt or truncated file, or an index that does not match its shards.
    """
    directory = Path(directory)
    single, index = directory / SINGLE_FILE_NAME, directory / INDEX_NAME
    if single.is_file():
        weight_map = None
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({err}); export the model again.") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shards {missing[:3]}; export the model again.")
    else:
        raise FileNotFoundError(
            f"No {SINGLE_FILE_NAME} or {INDEX_NAME} in {directory}; export with save_merged_model (an interrupted "
            "export leaves neither)."
        )
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for path in files:
        tensors, metadata = read_safetensors(path)
        if weight_map is not None:
            listed = {k for k, name in weight_map.items() if name == path.name}
            if listed != set(tensors):
                raise ValueError(f"{path.name} does not hold the tensors {index.name} lists; export the model again.")
        state.update(tensors)
        aliases.update(json.loads(metadata.get(TIED_KEYS_METADATA, "{}")))
    dangling = {alias: key for alias, key in aliases.items() if key not in state}
    if dangling:
        raise ValueError(
            f"{directory} lists tied weights {dangling} whose source tensors it does not hold: the export contradicts "
            "itself. Export the model again."
        )
    for alias, key in aliases.items():
        state[alias] = state[key]
    return state

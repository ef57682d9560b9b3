"""Adapter files: one adapter as ``adapter_model.safetensors`` plus ``adapter_config.json``, never pickle.

Three formats share these two file names:

- ``"peft"``: Hugging Face PEFT's format, loadable with ``peft.PeftModel.from_pretrained`` (see
  :mod:`lightning_lora.core.files.peft_format`).
- ``"vllm"``: PEFT's format restricted to what vLLM serves (one rank and scaling, only ``lora_A``/``lora_B``).
- ``"lightning_lora"``: our own, exact for every feature: the ``LoraConfig`` as JSON, tensors under the model's keys
  without the adapter name, and the initial factors of SVD-initialised adapters (``<layer>.lora_init_A``/``_B``) so
  a load onto the original base model rebuilds the residual base weights.

:func:`load_adapter` reads all of them (and adapters written by PEFT itself) and tells the format from the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from lightning_lora.core.common.distributed import full_tensor, uncompiled
from lightning_lora.core.common.safe_files import (
    PathLike,
    is_writer,
    publish,
    read_safetensors,
    staging_directory,
    write_safetensors,
)
from lightning_lora.core.config.adapter_config import AdapterConfig
from lightning_lora.core.config.quantization_config import QuantizationConfig
from lightning_lora.core.files.load_plan import LoadPlan, apply_load_plan
from lightning_lora.core.files.peft_export import peft_adapter_state
from lightning_lora.core.files.peft_format import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    lora_config_from_peft,
)
from lightning_lora.core.files.state import (
    adapter_state_dict,
    shared_state_for_file,
)
from lightning_lora.core.inits.initializers import initializer_fits_any_base
from lightning_lora.core.inits.svd_init import (
    INIT_FACTOR_DICTS,
    svd_init_factors,
)
from lightning_lora.core.kinds import KINDS, kind_of
from lightning_lora.core.kinds.nested_rank import active_rank, set_active_rank
from lightning_lora.core.kinds.trainable_tokens import find_token_layers, token_layer
from lightning_lora.core.layers.adapted_layer import AdapterSettings, lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config
from lightning_lora.core.layers.adapter_tensors import adapter_parameters
from lightning_lora.core.quantization.quantized_weights import quantized_layers
from lightning_lora.core.surgery.inject import apply_lora
from lightning_lora.core.surgery.snapshot import AdapterSnapshot
from lightning_lora.core.training.base_updates import check_base_untouched

AdapterFormat = Literal["peft", "vllm", "lightning_lora"]
FORMATS: tuple[str, ...] = ("peft", "vllm", "lightning_lora")
CONFIG_NAME = PEFT_CONFIG_NAME
WEIGHTS_NAME = PEFT_WEIGHTS_NAME
NATIVE_FORMAT_KEY = "lightning_lora_format"
NATIVE_FORMAT_VERSION = 1
# Beside a PEFT file written from a quantised base: how that base was quantised (PEFT's config has no field for it).
BASE_RECORD_NAME = "lightning_lora_base.json"


def save_adapter(
    model: nn.Module, directory: PathLike, adapter_name: str = "default", format: AdapterFormat = "peft"
) -> Path:
    """Save one adapter to ``directory`` as ``adapter_model.safetensors`` + ``adapter_config.json``.

    The write is atomic: files are staged beside ``directory`` and moved in with the config last, so an interrupted
    save never leaves an adapter that loads half-written. Other files in ``directory`` are kept. In a distributed
    run only global rank 0 writes; under FSDP2 every rank must call (sharded tensors are gathered).

    A PEFT or vLLM file of an adapter trained on a quantised base gets ``lightning_lora_base.json`` beside it (how
    the base was quantised), which :func:`read_adapter_config` reads back; PEFT ignores it.

    Args:
        model: The model holding the adapter. For ``"peft"``/``"vllm"`` tensor names are relative to it: pass the
            module PEFT would wrap (``lit_module.model`` rather than the LightningModule).
        directory: Folder to write (created if missing).
        adapter_name: Which adapter.
        format: ``"peft"`` (Hugging Face PEFT), ``"vllm"`` (PEFT restricted to what vLLM serves) or
            ``"lightning_lora"`` (exact for every feature).

    Returns:
        The directory, as a ``Path``.

    Raises:
        ValueError: Unknown format or adapter, or an adapter the format cannot hold (see
            :func:`~lightning_lora.core.files.peft_export.peft_adapter_state`). Nothing is written then.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    model = uncompiled(model)
    check_base_untouched(model, adapter_name)
    if format == "lightning_lora":
        config, tensors = native_adapter_state(model, adapter_name)
    else:
        config, tensors = peft_adapter_state(model, adapter_name, vllm=format == "vllm")
    directory = Path(directory)
    quantization = get_lora_config(model, adapter_name).quantization if format != "lightning_lora" else None
    if is_writer():
        with staging_directory(directory) as staging:
            write_safetensors(staging / WEIGHTS_NAME, tensors)
            if quantization is not None:
                record = {"quantization": dataclasses.asdict(quantization)}
                (staging / BASE_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            publish(staging, directory, entry_file=CONFIG_NAME, stale=[] if quantization else [BASE_RECORD_NAME])
    return directory


def native_adapter_state(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, Any], dict[str, Any]]:
    """One adapter in lightning_lora's own format: the config dict and the tensors.

    Tensor keys are the model's keys with the adapter name removed (``layers.0.q_proj.lora_A``), the state of
    ``modules_to_save`` and trained biases under their own keys, and SVD inits' initial factors as
    ``<layer>.lora_init_A`` / ``<layer>.lora_init_B``.
    """
    model = uncompiled(model)
    state = adapter_state_dict(model, adapter_name)
    adapter_keys = {key for key, _ in adapter_parameters(model, adapter_name)}
    suffix = f".{adapter_name}"
    tensors = {(k.removesuffix(suffix) if k in adapter_keys else k): full_tensor(v) for k, v in state.items()}
    for name, layer in lora_layers(model):
        factors = svd_init_factors(layer, adapter_name) if adapter_name in layer.lora_settings else None
        for dict_name, value in zip(INIT_FACTOR_DICTS, factors or ()):
            tensors[f"{name}.{dict_name}" if name else dict_name] = full_tensor(value.detach())
    tensors.update(shared_state_for_file(model, adapter_name, peft=False))
    adapter_config = get_lora_config(model, adapter_name)
    config = {
        NATIVE_FORMAT_KEY: NATIVE_FORMAT_VERSION,
        "adapter_name": adapter_name,
        "kind": adapter_config.kind,
        "lora_config": adapter_config.to_dict(),
    }
    rank = active_rank(model, adapter_name) if kind_of(adapter_config).lora_factors else None
    if rank is not None:
        config["active_rank"] = rank  # DyLoRA: the model computes with its first ranks; the file keeps them all
    return config, tensors


def read_adapter_files(directory: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict and the tensors of a saved adapter directory, checked for readability.

    Raises:
        FileNotFoundError: No such directory, or a missing ``adapter_config.json`` / ``adapter_model.safetensors``.
        ValueError: Only a pickle file (``adapter_model.bin``), invalid JSON, a truncated/corrupt safetensors file,
            or NaN/Inf values in a tensor (named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist; check the path.")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file() and (directory / "adapter_model.bin").is_file():
        raise ValueError(
            f"{directory} holds adapter_model.bin, a pickle file, which lightning_lora does not load (pickle can run "
            "code). Convert it once where you trust it: peft.PeftModel.from_pretrained(base, dir).save_pretrained("
            "dir, safe_serialization=True)."
        )
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing, so {directory} is not a complete adapter (an interrupted save leaves it so). "
                "Save the adapter again."
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); save the adapter again.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}; save the adapter again.")
    tensors, _ = read_safetensors(weights_path)
    broken = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise ValueError(
            f"{weights_path} holds NaN or Inf values in {broken[:3]}{' and more' if len(broken) > 3 else ''}: the "
            "adapter diverged or the file is damaged. Nothing was loaded; save a healthy adapter (an earlier "
            "checkpoint) again."
        )
    return config, tensors


def read_adapter_config(directory: PathLike, model: nn.Module) -> AdapterConfig:
    """The config of a saved adapter (either format; a ``LoraConfig`` or another kind's), as :func:`load_adapter`
    would use it on ``model``.

    Args:
        directory: Folder written by :func:`save_adapter` or PEFT's ``save_pretrained``.
        model: The model it is for (resolves PEFT's ``modules_to_save`` names).
    """
    config, _ = read_adapter_files(directory)
    return _lora_config(config, uncompiled(model), Path(directory))


def load_adapter(model: nn.Module, directory: PathLike, adapter_name: str = "default") -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` (any format) or by PEFT's ``save_pretrained``.

    When the model has no adapter called ``adapter_name``, it is added first from the saved config (as
    ``apply_lora`` does: the new adapter is active and trainable, everything else frozen), so training can continue.
    When it has one, its layers, ranks and scalings must match the file's. Everything is read and checked before
    the model keeps any change: on any error the model is as it was.

    A PEFT adapter whose config asks for an SVD init (``init_lora_weights="pissa"``) re-runs that init on the base
    weights before the trained values are loaded, as PEFT does. A lightning_lora file of an SVD-initialised adapter
    carries its initial factors, and the load turns the original base weights into the same residual, bit for bit,
    without an SVD. A lightning_lora file of a DyLoRA adapter keeps all its ranks and the one the model computed with,
    which the load sets again. A file trained on a quantised base loads onto an unquantised model with a warning.

    Args:
        model: The base model (or a model that already has the adapter).
        directory: The adapter's folder.
        adapter_name: Name of the adapter in the model (files do not fix a name).

    Returns:
        The same ``model``.

    Raises:
        FileNotFoundError: Missing directory or file.
        ValueError: Unreadable files, a config of another ``peft_type`` or with options lightning_lora lacks, keys or
            shapes that do not fit the model, or an existing adapter that differs from the saved one.
    """
    compiled, model = model, uncompiled(model)
    directory = Path(directory)
    values, tensors = read_adapter_files(directory)
    config = _lora_config(values, model, directory)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "The model still has weights on the meta device; load (or initialise) its base weights first, then the "
            "adapter."
        )
    native = NATIVE_FORMAT_KEY in values
    injected = adapter_name not in adapter_names(model)
    if injected and not initializer_fits_any_base(kind_of(config).init_name(config)):
        raise ValueError(
            f"{directory} holds a LoftQ adapter: it only fits the quantised base LoftQ chose with it, which "
            "load_adapter "
            "does not build. Build it first with apply_lora(model, read_adapter_config(directory, model), "
            "adapter_name), then call load_adapter."
        )
    rank = values.get("active_rank") if native else None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{directory / CONFIG_NAME}: active_rank must be a positive integer, got {rank!r}.")
    undo = _inject(model, config, adapter_name) if injected else _check_existing(model, config, adapter_name)
    try:
        plan = LoadPlan.build(model, adapter_name, tensors, native, injected, config)
        apply_load_plan(model, config, adapter_name, plan, injected)
        if rank is not None:
            set_active_rank(model, rank, adapter_name)
    except ValueError as err:
        undo()
        raise ValueError(f"{directory}: {err}") from None
    except BaseException:
        undo()
        raise
    if config.quantization is not None and not quantized_layers(model):
        warnings.warn(
            f"{directory} was trained on a {config.quantization.bits}-bit base, and this model is not quantised: "
            "outputs differ from the trained model's by the quantisation error. To continue as trained, quantise "
            "the base first: apply_lora(model, read_adapter_config(directory, model)), then load_adapter.",
            stacklevel=2,
        )
    return compiled


def _lora_config(values: Mapping[str, Any], model: nn.Module, directory: Path) -> AdapterConfig:
    if NATIVE_FORMAT_KEY in values:
        version = values[NATIVE_FORMAT_KEY]
        if version != NATIVE_FORMAT_VERSION:
            raise ValueError(
                f"{directory} was written in lightning_lora file format {version!r}; this version reads format "
                f"{NATIVE_FORMAT_VERSION}. Upgrade lightning_lora."
            )
        kind = values.get("kind", "lora")  # files written before the adapter kinds existed hold LoRA
        if kind not in KINDS:
            raise ValueError(
                f"{directory / CONFIG_NAME} holds a {kind!r} adapter, a kind this version does not know (it knows "
                f"{sorted(KINDS)}). Upgrade lightning_lora."
            )
        try:
            config = KINDS[kind].config_class.from_dict(values["lora_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{directory / CONFIG_NAME} holds no valid lora_config ({err}); save again.") from None
        if "kind" in values and config.kind != kind:  # older files have no kind (LoRA or DoRA)
            raise ValueError(
                f"{directory / CONFIG_NAME} says kind={kind!r}, but its lora_config describes a {config.kind!r} "
                "adapter: the file contradicts itself. Save the adapter again."
            )
        return config
    if "peft_type" in values:
        try:
            config = lora_config_from_peft(values, model)
        except ValueError as err:
            raise ValueError(f"{directory / CONFIG_NAME}: {err}") from None
        return _with_base_record(config, directory)
    raise ValueError(
        f"{directory / CONFIG_NAME} is neither a lightning_lora nor a PEFT adapter config (no "
        f"{NATIVE_FORMAT_KEY!r} or 'peft_type' field); point load_adapter at a folder written by save_adapter or "
        "PEFT's save_pretrained."
    )


def _with_base_record(config: AdapterConfig, directory: Path) -> AdapterConfig:
    """A PEFT file's config with the quantisation its base had, where ``save_adapter`` recorded it."""
    path = directory / BASE_RECORD_NAME
    if not path.is_file():
        return config
    try:
        quantization = QuantizationConfig.from_dict(json.loads(path.read_text())["quantization"])
        return dataclasses.replace(config, quantization=quantization)  # TypeError: a kind without quantization
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a valid record of a quantised base for this {type(config).__name__} ({err}); save the "
            "adapter again."
        ) from None


def _inject(model: nn.Module, config: AdapterConfig, adapter_name: str) -> Callable[[], None]:
    """Add the adapter as ``apply_lora`` does, without running its init (the file supplies the values) and without
    quantising the base (adapter files do not depend on it: the model is used as it is given); return the function
    that takes it out again."""
    snapshot = AdapterSnapshot(model, adapter_name)
    unquantized = dataclasses.replace(config, quantization=None) if config.quantization is not None else config
    apply_lora(model, unquantized, adapter_name, initialize=False)
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_settings:
            layer.lora_settings[adapter_name].config = config
    return snapshot.restore


def _check_existing(model: nn.Module, config: AdapterConfig, adapter_name: str) -> Callable[[], None]:
    problems = []
    token_rows = {name: indices for name, _, indices, _ in find_token_layers(model, config)}
    for name, layer in lora_layers(model):
        settings = layer.lora_settings.get(adapter_name)
        if settings is None:
            continue
        if adapter_name in layer.merged_adapters:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into {name}; call unmerge_lora(model) before loading into it."
            )
        if token_layer(layer, adapter_name):
            if token_rows.get(name) != settings.token_indices:
                in_file = token_rows.get(name)
                problems.append(f"{name}: model trains rows {list(settings.token_indices)}, file {in_file}")
            continue
        saved = AdapterSettings(config.rank_for(name), config.alpha_for(name), 0.0, kind_of(config), config)
        if (settings.kind.name, settings.r) != (saved.kind.name, saved.r) or not (
            math.isclose(settings.alpha, saved.alpha, rel_tol=1e-6)
            and math.isclose(settings.scaling, saved.scaling, rel_tol=1e-6)
        ):
            problems.append(
                f"{name}: model {settings.kind.name} r={settings.r}, alpha={settings.alpha:g}, scaling "
                f"{settings.scaling:g}; file {saved.kind.name} r={saved.r}, alpha={saved.alpha:g}, scaling "
                f"{saved.scaling:g}"
            )
    if problems:
        raise ValueError(
            f"The model's adapter {adapter_name!r} differs from the saved one ({'; '.join(problems[:3])}). Load into a "
            "model without that adapter (load_adapter adds it from the file), or under another adapter_name."
        )
    return lambda: None

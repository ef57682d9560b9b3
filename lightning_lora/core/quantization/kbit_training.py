"""Preparing a model with a quantised base for training (PEFT's ``prepare_model_for_kbit_training``): float32
everything that is not quantised, trainable 4-bit layouts, and inputs that require grad under gradient
checkpointing."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_lora.core.quantization.quantized_weights import keep_training_layout, quantized_bits

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    # Hugging Face models bring their own norm classes (LlamaRMSNorm, T5LayerNorm, ...).
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))


def prepare_for_kbit_training(
    model: nn.Module, upcast: Literal["all", "norms", "none"] = "all", gradient_checkpointing: bool = False
) -> nn.Module:
    """Prepare a model with a quantised base for adapter training, in place (as PEFT's
    ``prepare_model_for_kbit_training``).

    Keeps 4-bit layers trainable (:func:`keep_training_layout`), casts half-precision parameters that are not
    quantised to float32 for stable training, and makes the input embeddings' output require grad
    (:func:`enable_input_gradients`), so that adapters inside reentrant gradient-checkpointed blocks receive
    gradients although every base weight is frozen.

    Args:
        model: The model, before or after ``apply_lora``.
        upcast: Which float16/bfloat16 parameters and buffers become float32: ``"all"`` that are not quantised
            (PEFT's choice; needed when training without autocast, since the norms' float32 outputs then meet the
            other layers), ``"norms"`` only those of normalisation layers (``LayerNorm``, ``RMSNorm``,
            ``GroupNorm``, batch norms, Hugging Face ``*Norm`` classes; for bf16/fp16 autocast training, as in the
            QLoRA paper), or ``"none"``.
        gradient_checkpointing: Also switch on the model's own gradient checkpointing
            (``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` of Hugging Face models).

    Raises:
        ValueError: An unknown ``upcast``, or ``gradient_checkpointing=True`` for a model without such a method.
    """
    if upcast not in ("all", "norms", "none"):
        raise ValueError(f"upcast must be 'all', 'norms' or 'none', got {upcast!r}.")
    enable_checkpointing = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if gradient_checkpointing and not callable(enable_checkpointing):
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); pass gradient_checkpointing=False and "
            "wrap its blocks with torch.utils.checkpoint yourself (input gradients are enabled by this function)."
        )
    keep_training_layout(model)
    if upcast != "none":
        for module in model.modules():
            if upcast == "all" or _is_norm(module):
                for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    # 4-bit data may be stored as bf16 (sharded by FSDP2 it is a DTensor: known by its layer)
                    packed = tensor is getattr(module, "weight", None) and quantized_bits(module) is not None
                    if tensor.dtype in (torch.float16, torch.bfloat16) and not packed:
                        tensor.data = tensor.data.float()
    enable_input_gradients(model)
    if gradient_checkpointing:
        enable_checkpointing()
    return model


_INPUT_GRAD_HOOK = "_lora_input_grad_hook"


def enable_input_gradients(model: nn.Module) -> nn.Module:
    """Make the model's first activations require grad (once), even though its inputs and embeddings are frozen.

    Uses the input embeddings (``get_input_embeddings()``, else the first ``nn.Embedding``); a model without
    embeddings gets its floating-point inputs marked instead.

    Args:
        model: Any module.
    """
    if _INPUT_GRAD_HOOK in model.__dict__:
        return model
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        embeddings = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embeddings is not None:
        handle = embeddings.register_forward_hook(_output_requires_grad)
    else:
        handle = model.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)
    model.__dict__[_INPUT_GRAD_HOOK] = handle
    return model


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


def _inputs_require_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def mark(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
            return value.detach().requires_grad_(True)
        return value

    return tuple(mark(a) for a in args), {k: mark(v) for k, v in kwargs.items()}

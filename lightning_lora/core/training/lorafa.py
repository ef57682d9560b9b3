"""The LoRA-FA optimizer: ``A`` frozen, ``B``'s gradient projected, then an AdamW step (as PEFT's
``create_lorafa_optimizer``).

LoRA-FA (Zhang et al. 2023, https://arxiv.org/abs/2308.03303) freezes ``A`` at its random init. With ``A`` fixed,
the update ``scaling * B A`` that best approximates full fine-tuning's gradient step ``g`` (in Frobenius norm) comes
from ``B``'s gradient ``g_B = scaling * g A^T`` projected as ``g_B (A A^T)^{-1} / scaling^2``. This optimizer applies
that projection to each ``B`` and then Hugging Face's AdamW (bias correction optional, decoupled weight decay after
the step) to it; everything else trainable gets the same AdamW without projection. The numbers follow PEFT 0.21's
``peft.optimizers.LoraFAOptimizer`` step for step, including its ridge ``1e-8 I`` under ``pinv`` and its bfloat16
projection matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_lora.core.common.checks import is_finite_number
from lightning_lora.core.common.distributed import is_dtensor, is_sharded
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_set import adapter_names
from lightning_lora.core.layers.layer_types import ConvAdapters, EmbeddingAdapters
from lightning_lora.core.training.param_groups import freeze_lora_A

RIDGE = 1e-8  # PEFT's ``delta``: (A A^T + RIDGE * I) is pseudo-inverted


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW whose LoRA groups project each ``B``'s gradient onto what a frozen ``A`` can express (LoRA-FA).

    A LoRA group holds ``params`` (the ``B`` matrices ``[out, r]``), ``lora_A`` (each one's frozen ``A`` ``[r, in]``,
    same order) and ``scaling`` (each layer's ``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA). ``B``'s gradient
    becomes ``grad_B @ pinv(A A^T + 1e-8 I) / scaling^2`` before the moments. Groups without ``lora_A`` are plain
    AdamW. The per-step update is Hugging Face's AdamW, as PEFT's: ``p -= step_size * m / (sqrt(v) + eps)``, then
    ``p -= lr * weight_decay * p``. State per parameter: an int ``step`` and tensors ``exp_avg``, ``exp_avg_sq``, so
    torch's ``state_dict`` / ``load_state_dict`` restore it exactly. ``A`` is referenced, never saved in the state.

    Args:
        params: Parameters or parameter groups (see above for LoRA groups).
        lr: Learning rate (default ``1e-3``).
        betas: Decay rates of the first and second moments (default ``(0.9, 0.999)``).
        eps: Added to the denominator (default ``1e-6``, as PEFT).
        weight_decay: Decoupled weight decay, applied after the Adam step (default ``0``).
        correct_bias: Adam's bias correction (default ``True``).
        projection_dtype: The dtype of the ``grad_B @ (A A^T)^{-1}`` product. PEFT computes it under bfloat16
            autocast wherever bfloat16 is available (CPUs, Ampere and newer GPUs); the default ``torch.bfloat16``
            reproduces that. ``None`` keeps the gradient's dtype (full precision).

    Raises:
        ValueError: A learning rate, eps or weight decay that is negative or not finite, betas that are not two
            numbers in ``[0, 1)``; a LoRA group whose ``lora_A`` or ``scaling`` does not match its ``params`` (one
            each, ``A`` ``[r, in]`` with the rank of its ``B`` ``[out, r]``, on the same device; scalings finite and
            > 0); an ``A`` that trains (``requires_grad``, or a parameter of any group: the projection assumes it
            fixed); a sharded (``DTensor``) parameter. Nothing is added to the optimizer then.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        projection_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        check_adamw_arguments(lr, betas, eps, weight_decay)
        if projection_dtype is not None and not (
            isinstance(projection_dtype, torch.dtype) and projection_dtype.is_floating_point
        ):
            raise ValueError(
                f"projection_dtype must be a floating torch.dtype (torch.bfloat16, as PEFT) or None (full precision), "
                f"got {projection_dtype!r}."
            )
        betas = (float(betas[0]), float(betas[1]))
        self.projection_dtype = projection_dtype
        self._lora_A: dict[torch.Tensor, torch.Tensor] = {}  # B -> its frozen A (kept out of state_dict)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a LoRA group's ``lora_A`` list is taken out of it and remembered beside its ``B``s."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        lora_A = group.pop("lora_A", None)
        if any(is_dtensor(p) for p in [*group["params"], *(lora_A or [])]):
            raise ValueError(
                "LoraFAOptimizer needs whole (unsharded) tensors: FSDP2 and tensor parallelism shard them as DTensor. "
                "Train with DDP, or use torch.optim.AdamW(lora_param_groups(model, lr, lora_fa=True)) (A frozen, no "
                "gradient projection)."
            )
        held = {id(p) for g in getattr(self, "param_groups", []) for p in g["params"]}
        frozen_As = {id(A) for A in self._lora_A.values()}
        trained_As = [i for i, p in enumerate(group["params"]) if id(p) in frozen_As]
        if trained_As:
            raise ValueError(
                f"Parameters {trained_As} of this group are the frozen `lora_A` of a LoRA group: LoRA-FA projects B's "
                "gradient for a fixed A, so A must not train. Leave the A matrices out of every group's params."
            )
        if lora_A is not None:
            lora_A = list(lora_A)
            scaling = group.get("scaling")
            if scaling is None or not len(lora_A) == len(scaling) == len(group["params"]):
                raise ValueError("A LoRA group needs one `lora_A` tensor and one `scaling` per parameter (B).")
            for index, (B, A, factor) in enumerate(zip(group["params"], lora_A, scaling)):
                _check_lora_pair(index, B, A, factor, held | {id(p) for p in group["params"]})
            group["scaling"] = [float(s) for s in scaling]
        super().add_param_group(group)  # torch's own checks (a parameter in two groups, ...) before we keep A
        if lora_A is not None:
            self._lora_A.update(zip(group["params"], lora_A))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Do one optimization step.

        Args:
            closure: Re-evaluates the model and returns the loss (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = []  # everything is checked before the first parameter changes
        for group in self.param_groups:
            scalings = group.get("scaling")
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LoraFAOptimizer does not support sparse gradients; use dense embeddings.")
                if scalings is not None and p not in self._lora_A:
                    raise RuntimeError(
                        "LoraFAOptimizer's parameters were replaced after it was built (DeepSpeed ZeRO flattens "
                        "them); it supports one device and DDP. Use torch.optim.AdamW(lora_param_groups(model, lr, "
                        "lora_fa=True))."
                    )
                updates.append((p, group, None if scalings is None else scalings[index]))
        for p, group, scaling in updates:
            grad = p.grad if scaling is None else self._projected_grad(p, scaling)
            self._adamw_update(p, grad, group)
        return loss

    def _projected_grad(self, B: torch.Tensor, scaling: float) -> torch.Tensor:
        A = self._lora_A[B]
        AA_T = A @ A.T
        inverse = torch.linalg.pinv(AA_T + RIDGE * torch.eye(A.shape[0]).to(A.device))
        grad = B.grad
        if self.projection_dtype is not None:
            grad, inverse = grad.to(self.projection_dtype), inverse.to(self.projection_dtype)
        projected = (1 / scaling**2) * (grad @ inverse)
        return projected if projected.dtype == B.grad.dtype else projected.to(B.grad.dtype)

    def _adamw_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0  # a Python int, as PEFT: beta ** step is then computed in double precision
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def check_adamw_arguments(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Raise a ValueError naming the fix unless the AdamW hyperparameters of :class:`LoraFAOptimizer` are valid:
    ``lr``, ``eps`` and ``weight_decay`` finite and >= 0, ``betas`` two finite numbers in ``[0, 1)``."""
    if not (is_finite_number(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate {lr!r}: it must be a finite number >= 0 (e.g. 1e-4).")
    if not (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(is_finite_number(beta) and 0.0 <= beta < 1.0 for beta in betas)
    ):
        raise ValueError(
            f"Invalid betas {betas!r}: give two decay rates, each in [0, 1) (1.0 would never forget; the default is "
            "(0.9, 0.999))."
        )
    if not (is_finite_number(eps) and eps >= 0.0):
        raise ValueError(f"Invalid eps {eps!r}: it must be a finite number >= 0 (PEFT's default 1e-6).")
    if not (is_finite_number(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay {weight_decay!r}: it must be a finite number >= 0 (0: none).")


def _check_lora_pair(index: int, B: Any, A: Any, scaling: Any, group_params: set[int]) -> None:
    """Raise a ValueError naming the fix unless ``A`` is a frozen ``[r, in]`` matrix for ``B`` ``[out, r]``."""
    where = f"LoRA group entry {index}"
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.dim() == 2 and B.dim() == 2):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (B, A)]
        raise ValueError(f"{where}: B {shapes[0]} and its lora_A {shapes[1]} must be matrices [out, r] and [r, in].")
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{where}: lora_A {tuple(A.shape)} has rank {A.shape[0]}, its B {tuple(B.shape)} rank {B.shape[1]}; pair "
            "each B with the A of its own layer and adapter (lorafa_optimizer(model, lr) builds the groups)."
        )
    if A.device != B.device:
        raise ValueError(f"{where}: lora_A is on {A.device}, its B on {B.device}; move the model to one device first.")
    if not (is_finite_number(scaling) and scaling > 0):
        raise ValueError(f"{where}: scaling must be a finite number > 0 (the layer's alpha / r), got {scaling!r}.")
    if A.requires_grad or id(A) in group_params:
        raise ValueError(
            f"{where}: lora_A still trains (requires_grad=True, or it is a parameter of a group), but LoRA-FA projects "
            "B's gradient for a fixed A. Freeze it first (freeze_lora_A(model), or lorafa_optimizer(model, lr), which "
            "does both)."
        )


def lorafa_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    adapter_name: str | None = None,
    projection_dtype: torch.dtype | None = torch.bfloat16,
) -> LoraFAOptimizer:
    """LoRA-FA: freeze the LoRA ``A`` matrices (in place) and return a :class:`LoraFAOptimizer` over what trains.

    One group ``"lora_B"`` pairs each trainable ``B`` with its frozen ``A`` and its layer's scaling (rsLoRA
    included, per-layer ``rank_pattern`` / ``alpha_pattern`` too); one group ``"other"`` holds every other trainable
    parameter (``modules_to_save``, biases), trained by the same AdamW without projection and the same weight decay,
    as PEFT's ``create_lorafa_optimizer`` does. Build it after the adapters exist (in ``configure_optimizers``).

    Args:
        model: A model with LoRA adapters (or a module containing one, such as a LightningModule).
        lr: Learning rate.
        betas: Decay rates of the moments (default ``(0.9, 0.999)``, as PEFT).
        eps: Added to the denominator (default ``1e-6``, as PEFT).
        weight_decay: Decoupled weight decay of every parameter (default ``0``).
        correct_bias: Adam's bias correction (default ``True``).
        adapter_name: The LoRA adapter to train LoRA-FA style; default: every adapter.
        projection_dtype: See :class:`LoraFAOptimizer` (default bfloat16, as PEFT; ``None``: full precision).

    Raises:
        ValueError: The model has no adapter (of that name); an adapter is not plain LoRA (DoRA, LoHa, ...); an
            adapter sits on an embedding or convolution; the model is sharded (FSDP, FSDP2); nothing trains.

    Example::

        import torch
        from lightning_lora import LoraConfig, apply_lora, lorafa_optimizer

        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
        optimizer = lorafa_optimizer(model, lr=1e-3)  # A frozen; B's gradient projected
    """
    check_adamw_arguments(lr, betas, eps, weight_decay)
    present = adapter_names(model)
    selected = present if adapter_name is None else [adapter_name]
    if not present or adapter_name not in (None, *present):
        raise ValueError(
            f"The model has no adapter {adapter_name or ''!r} (it has {present}); add a LoRA adapter with "
            "apply_lora(model, LoraConfig(...)) (or LoraCallback) before building the optimizer."
        )
    if is_sharded(model):
        raise ValueError(
            "lorafa_optimizer needs whole tensors, but the model is sharded (FSDP / FSDP2 / tensor parallel). Train "
            "with DDP, or use torch.optim.AdamW(lora_param_groups(model, lr, lora_fa=True)) (A frozen, no projection)."
        )
    pairs: list[tuple[nn.Parameter, nn.Parameter, float]] = []
    for layer_name, layer in lora_layers(model):
        for name in selected:
            settings = layer.lora_settings.get(name)
            if settings is None:
                continue
            if not settings.kind.lora_factors:
                raise ValueError(
                    f"Adapter {name!r} on {layer_name} is {settings.kind.display_name}; LoRA-FA's projection is "
                    "defined for plain LoRA factors only (as PEFT's). Use LoraConfig without use_dora, pass "
                    "adapter_name= of a LoRA adapter, or train this one with torch.optim.AdamW(lora_param_groups("
                    "model, lr, lora_fa=True))."
                )
            if isinstance(layer, (EmbeddingAdapters, ConvAdapters)):
                raise ValueError(  # noqa: TRY004  (a layer the method does not cover, not a wrong argument type)
                    f"{layer_name} is a {type(layer).base_class.__name__}: lorafa_optimizer supports LoRA on linear "
                    "layers (nn.Linear, Hugging Face Conv1D) only, as PEFT's (an embedding's A starts at zero, so "
                    "frozen it would never train; a convolution's A is a kernel). Leave it out with "
                    f"LoraConfig(exclude_modules=[{layer_name.rsplit('.', 1)[-1]!r}])."
                )
            if layer.lora_B[name].requires_grad:
                pairs.append((layer.lora_A[name], layer.lora_B[name], settings.scaling))
    # Everything is checked before the A matrices are frozen, and they thaw again if the optimizer refuses.
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    freeze_lora_A(model, adapter_name)
    try:
        lora_B_ids = {id(B) for _, B, _ in pairs}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_B_ids]
        if not pairs and not others:
            raise ValueError("The model has nothing to train; apply_lora(model, config) makes the adapter trainable.")
        groups: list[dict[str, Any]] = []
        if pairs:
            A, B, scaling = (list(column) for column in zip(*pairs))
            groups.append({"name": "lora_B", "params": B, "lora_A": A, "scaling": scaling})
        if others:
            groups.append({"name": "other", "params": others})
        return LoraFAOptimizer(groups, lr, betas, eps, weight_decay, correct_bias, projection_dtype)
    except BaseException:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
        raise

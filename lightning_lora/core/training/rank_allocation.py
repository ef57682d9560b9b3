"""AdaLoRA's budget: importance scores, the cubic rank schedule, masking, and the orthogonality penalty.

Pure PyTorch, for any training loop: after each optimizer step call :meth:`RankAllocator.step` with the index of
that step (0 for the first); add :func:`orthogonality_penalty` to the loss (or backpropagate it on its own). The
Lightning callback ``AdaLoraSchedule`` does both. The arithmetic is PEFT's ``RankAllocator`` operation for operation
(same masks on the same gradients). Sharded (FSDP2) tensors are gathered whole, so every rank takes the same
decisions from the same (already reduced) gradients.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_lora.core.common.distributed import copy_into, full_tensor
from lightning_lora.core.kinds.adalora import AdaLoraConfig, check_schedule
from lightning_lora.core.layers.adapted_layer import LoraLayer

Pattern = dict[str, list[bool]]
_FACTORS = ("lora_E", "lora_A", "lora_B")


class RankAllocator:
    """Decides, every ``delta_t`` optimizer steps, which ranks of an AdaLoRA adapter survive.

    Args:
        layers: ``(name, layer)`` of every layer holding the adapter; names key the rank patterns.
        adapter_name: The AdaLoRA adapter.
        config: Its config.
        total_step: Optimizer steps of the run (``config.total_step`` when given).

    Raises:
        ValueError: The layers hold no AdaLoRA adapter of that name, or the schedule leaves no budgeting phase.
    """

    def __init__(self, layers: list[tuple[str, LoraLayer]], adapter_name: str, config: AdaLoraConfig, total_step: int):
        self.layers = [(name, layer) for name, layer in layers if adapter_name in layer.lora_settings]
        if not self.layers or not all(layer.lora_settings[adapter_name].kind.rank_budget for _, layer in self.layers):
            raise ValueError(
                f"Adapter {adapter_name!r} is not an AdaLoRA adapter on this model; add it with "
                "LoraCallback(AdaLoraConfig(...), adapter_name=...) or apply_lora(model, AdaLoraConfig(...))."
            )
        check_schedule(config, total_step)
        self.adapter_name, self.config, self.total_step = adapter_name, config, total_step
        self.initial_budget = sum(layer.lora_settings[adapter_name].r for _, layer in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        self.scores: dict[str, dict[str, torch.Tensor]] = {}  # "<layer>.<factor>" -> ipt, exp_avg_ipt, exp_avg_unc
        self.final_pattern: Optional[Pattern] = None

    @property
    def final_step(self) -> int:
        """The step at which the allocation becomes final."""
        return self.total_step - self.config.tfinal

    def budget(self, step: int) -> tuple[int, bool]:
        """``(total rank allowed after ``step``, whether ranks are re-allocated at ``step``)``: the cubic schedule."""
        config = self.config
        if step <= config.tinit:
            return self.initial_budget, False
        if step > self.final_step:
            return self.target_budget, True
        remaining = 1 - (step - config.tinit) / (self.final_step - config.tinit)
        budget = int((self.initial_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % config.delta_t == 0

    def _factor(self, layer: LoraLayer, factor: str) -> torch.Tensor:
        return getattr(layer, factor)[self.adapter_name]

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold this step's sensitivity ``|p * grad|`` of every adapter entry into the two moving averages."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, layer in self.layers:
            for factor in _FACTORS:
                parameter = self._factor(layer, factor)
                if parameter.grad is None:
                    raise RuntimeError(
                        f"{name}.{factor} has no gradient at the AdaLoRA allocation step: update the allocation after "
                        "backward and the optimizer step, before zero_grad."
                    )
                value, grad = full_tensor(parameter.detach()), full_tensor(parameter.grad)
                entry = self.scores.setdefault(
                    f"{name}.{factor}", {"exp_avg_ipt": torch.zeros_like(value), "exp_avg_unc": torch.zeros_like(value)}
                )
                ipt = (value * grad).abs()
                entry["exp_avg_ipt"] = beta1 * entry["exp_avg_ipt"] + (1 - beta1) * ipt
                entry["exp_avg_unc"] = beta2 * entry["exp_avg_unc"] + (1 - beta2) * (ipt - entry["exp_avg_ipt"]).abs()

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """One score per rank of every layer: its singular value's score plus the mean scores of its vectors."""
        scores = {}
        for name, _ in self.layers:
            element = {
                f: self.scores[f"{name}.{f}"]["exp_avg_ipt"] * self.scores[f"{name}.{f}"]["exp_avg_unc"]
                for f in _FACTORS
            }
            score_A = torch.mean(element["lora_A"], dim=1, keepdim=True)
            score_B = torch.mean(element["lora_B"], dim=0, keepdim=False).view(-1, 1)
            vectors = torch.cat([score_A, score_B], dim=1).sum(dim=1, keepdim=False)
            scores[name] = element["lora_E"].view(-1) + vectors.view(-1)
        return scores

    def mask_to_budget(self, budget: int) -> Pattern:
        """Keep the ``budget`` most important ranks over all layers, zero the others' singular values."""
        scores = self._triplet_scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.initial_budget - budget)[0].item()
        pattern = {name: (~(score <= threshold)).tolist() for name, score in scores.items()}
        self.apply_pattern(pattern)
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: Pattern) -> None:
        """Zero the singular values of the ranks ``pattern`` prunes."""
        for name, layer in self.layers:
            E = self._factor(layer, "lora_E")
            full = full_tensor(E.detach()).clone()
            keep = torch.tensor(pattern[name], dtype=torch.bool, device=full.device).unsqueeze(-1)
            copy_into(E, full.masked_fill_(~keep, 0.0))

    def step(self, step: int) -> Optional[Pattern]:
        """Everything AdaLoRA does after optimizer step ``step`` (0-based): update the scores, re-allocate on the
        schedule, fix the allocation at ``total_step - tfinal``, and keep pruned ranks at zero after it.

        Returns:
            The allocation when ranks were re-allocated at this step, else None.
        """
        if step < self.final_step:
            self.update_importance()
            budget, reallocate = self.budget(step)
            return self.mask_to_budget(budget) if reallocate else None
        if step == self.final_step:
            self.final_pattern = self.mask_to_budget(self.target_budget)
            self.scores = {}
            return self.final_pattern
        self.apply_pattern(self.final_pattern)
        return None

    def ranks(self) -> dict[str, int]:
        """The rank each layer has now (non-zero singular values)."""
        return {
            name: int((full_tensor(self._factor(layer, "lora_E").detach()) != 0).sum()) for name, layer in self.layers
        }

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "final_pattern": self.final_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = {key: dict(entry) for key, entry in state["scores"].items()}
        self.final_pattern = state["final_pattern"]


def orthogonality_penalty(layers: list[tuple[str, LoraLayer]], adapter_name: str) -> torch.Tensor:
    """AdaLoRA's regulariser: the mean over every ``A`` and ``B`` of ``||A A^T - I||_F`` / ``||B^T B - I||_F``.

    Differentiable through sharded (FSDP2) tensors: each rank computes it from the gathered factors.
    """
    total, count = None, 0
    for _, layer in layers:
        if adapter_name not in layer.lora_settings:
            continue
        for factor in ("lora_A", "lora_B"):
            parameter = getattr(layer, factor)[adapter_name]
            value = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            covariance = value @ value.T if factor == "lora_A" else value.T @ value
            identity = torch.eye(*covariance.size(), out=torch.empty_like(covariance))
            norm = torch.norm(covariance - identity, p="fro")
            total = norm if total is None else total + norm
            count += 1
    if total is None:
        raise ValueError(f"The model has no AdaLoRA adapter {adapter_name!r} to regularise.")
    return total / count

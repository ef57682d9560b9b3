"""AdaLoRA's rank budget as a callback: importance scores, re-allocation and the orthogonality penalty, all without
a line in ``training_step`` (PEFT users must call ``update_and_allocate`` in their own loop)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora.core.common.safe_files import is_writer
from lightning_lora.core.kinds import AdapterKind
from lightning_lora.core.kinds.adalora import AdaLoraConfig
from lightning_lora.core.training.rank_allocation import RankAllocator, orthogonality_penalty
from lightning_lora.lightning.schedules.base import AdapterSchedule, warn_beyond_run

ALLOCATION_FILE = "adalora_ranks.json"
HEATMAP_FILE = "adalora_ranks.png"


class AdaLoraSchedule(AdapterSchedule):
    """Runs AdaLoRA's budget on an ``AdaLoraConfig`` adapter (Zhang et al. 2023).

    After every optimizer step: the importance of every adapter entry is updated (sensitivity ``|p * grad|`` with
    the two moving averages), and on the schedule (``tinit``, ``delta_t``, ``tfinal``, ``total_step`` of the config)
    the least important ranks over all layers are pruned until ``target_r`` per layer remain on average. After
    every backward the orthogonality penalty's gradient (``orth_reg_weight``) is added to the adapter's. The final
    allocation becomes the adapter's ``rank_pattern``, so exported PEFT files hold only the surviving ranks.

    Logged: the total rank (``adalora/budget``) and each layer's rank (``adalora/rank/<layer>``) when ranks change,
    the penalty (``adalora/orthogonality``). At the end of fit (with a logger) the final allocation is written to the
    logger's folder as ``adalora_ranks.json`` and, when matplotlib is installed, as a heatmap ``adalora_ranks.png``
    (layers by module type).

    Args:
        adapter_name: The AdaLoRA adapter.
        heatmap: Write the allocation heatmap at the end of fit.

    Example::

        config = AdaLoraConfig(init_r=12, target_r=4, target_modules=["q_proj", "v_proj"], tinit=50, tfinal=100)
        trainer = L.Trainer(callbacks=[LoraCallback(config), AdaLoraSchedule()], max_steps=1000)
    """

    works_on = "AdaLoRA adapters (a rank budget to allocate)"

    def accepts(self, kind: AdapterKind) -> bool:
        return kind.rank_budget
    metric_prefix = "adalora"

    def __init__(self, adapter_name: str = "default", heatmap: bool = True) -> None:
        super().__init__(adapter_name)
        self.heatmap = heatmap
        self.allocator: Optional[RankAllocator] = None
        self._penalty = math.nan

    def config(self) -> AdaLoraConfig:
        return self.layers[0][1].lora_settings[self.adapter_name].config

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.config()
        total_step = config.total_step
        if total_step is None:
            estimated = trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "AdaLoRA's budget schedule needs the run's number of optimizer steps, and this Trainer cannot "
                    "tell it (no max_steps, and a dataloader without a length). Set max_steps, or "
                    "AdaLoraConfig(total_step=...)."
                )
            total_step = int(estimated)
        self.allocator = RankAllocator(self.layers, self.adapter_name, config, total_step)
        if config.total_step is not None:  # asked for a schedule longer than the run: the budget never gets there
            warn_beyond_run(
                trainer,
                config.total_step - 1,
                f"AdaLoraConfig(total_step={config.total_step}) plans its rank budget down to target_r="
                f"{config.target_r} over {config.total_step} optimizer steps; its last step",
            )

    @override
    def restore_state(self, state: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.allocator.load_state_dict(state["allocator"])
        if state.get("rank_pattern") is not None:
            self.config().rank_pattern = state["rank_pattern"]

    @override
    def schedule_state(self) -> dict[str, Any]:
        if self.allocator is None:
            return {}
        return {"allocator": self.allocator.state_dict(), "rank_pattern": self.config().rank_pattern}

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weight = self.config().orth_reg_weight
        if weight == 0 or not pl_module.training:
            return
        # A callback cannot change the loss training_step returned: back-propagate the penalty's share on its own.
        # Its gradient depends only on the adapter tensors, equal on every rank, so it needs no reduction.
        penalty = orthogonality_penalty(self.layers, self.adapter_name)
        (penalty * (weight / trainer.accumulate_grad_batches)).backward()
        self._penalty = float(penalty.detach())

    @override
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        metrics = {} if math.isnan(self._penalty) else {"orthogonality": self._penalty}
        pattern = self.allocator.step(step)
        if pattern is None:
            return metrics
        if self.allocator.final_pattern is not None:
            self.config().rank_pattern = self.allocator.final_pattern
        ranks = self.allocator.ranks()
        metrics["budget"] = sum(ranks.values())
        metrics.update({f"rank/{name}": rank for name, rank in ranks.items()})
        return metrics

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.allocator is None or trainer.logger is None or not is_writer():
            return
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = self.allocator.ranks()
        (directory / ALLOCATION_FILE).write_text(json.dumps({"ranks": ranks, "final": self.config().rank_pattern}))
        if self.heatmap:
            path = write_rank_heatmap(ranks, directory / HEATMAP_FILE, self.config().init_r)
            rank_zero_info(f"AdaLoRA allocation written to {path or directory / ALLOCATION_FILE}.")


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """``(row labels, column labels, values)``: layers (the number in ``...layers.3.q_proj``) by module type (the
    last name part); cells without an adapted layer are NaN."""
    rows: dict[str, dict[str, int]] = {}
    for name, rank in ranks.items():
        numbers = re.findall(r"\.(\d+)\.", f".{name}.")
        row = numbers[-1] if numbers else name.rpartition(".")[0] or "-"
        rows.setdefault(row, {})[name.rpartition(".")[2]] = rank
    columns = list(dict.fromkeys(column for cells in rows.values() for column in cells))
    labels = sorted(rows, key=lambda label: (not label.isdigit(), int(label) if label.isdigit() else 0, label))
    return labels, columns, [[rows[label].get(column, math.nan) for column in columns] for label in labels]


def write_rank_heatmap(ranks: dict[str, int], path: Path, init_r: int) -> Optional[Path]:
    """Draw the allocation as a heatmap PNG; returns None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rank_zero_warn("The AdaLoRA rank heatmap needs matplotlib (pip install matplotlib); wrote the JSON only.")
        return None
    labels, columns, values = rank_grid(ranks)
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.35 * len(labels)))
    image = axes.imshow(values, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    axes.set_title("AdaLoRA final ranks")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axes.text(j, i, str(int(value)), ha="center", va="center", color="white", fontsize=7)
    figure.colorbar(image, ax=axes, label="rank")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

"""DyLoRA as a callback: a rank sampled every optimizer step, so one trained LoRA adapter works at every rank up to
``r`` (Valipour et al. 2022, https://arxiv.org/abs/2210.07558). The rank's math is the core's
(:mod:`lightning_lora.core.kinds.nested_rank`); this callback decides when."""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_lora.core.kinds.nested_rank import NESTED_UPDATES, active_rank, nested_layers, set_active_rank
from lightning_lora.lightning.schedules.base import AdapterSchedule


class DyLoraSchedule(AdapterSchedule):
    """Trains a plain LoRA adapter for every rank at once (DyLoRA).

    Before the first micro-batch of every optimizer step a rank ``b`` is drawn uniformly from
    ``min_rank..r`` (the paper's uniform distribution over ranks, as the authors' ``torch.randint`` per step); the
    adapter then computes with the first ``b`` rows of ``A`` and columns of ``B`` and scaling ``alpha / b``
    (``alpha / sqrt(b)`` with rsLoRA), see :mod:`lightning_lora.core.kinds.nested_rank`. With ``update="last"`` only the
    ``b``-th row and column get gradients (the paper's "frozen" mode, which the authors' training script uses); with
    ``"nested"`` all first ``b`` do. The other ranks get zero gradients (detached in forward, as in the authors'
    code), so an optimizer with momentum or weight decay still moves them.

    Validation, test and predict run at ``eval_rank``, and so does the model between training steps: fit ends there,
    and callbacks that export or merge at train end (``AdapterExport``, ``merge_on_fit_end``) see that rank.
    Evaluate other ranks with ``set_active_rank(model, b)`` after fit (test and predict then keep the rank you
    chose); keep one for good with ``truncate_adapter(model, b)`` (PEFT export then writes a plain rank-``b`` LoRA;
    exporting while a rank is active writes that rank too).

    Ranks come from the callback's own ``torch.Generator``: the same on every DDP/FSDP2 process, saved in checkpoints,
    so a resumed run draws what an uninterrupted one would. Logged: ``dylora/rank``, the rank of each step.

    Args:
        adapter_name: The LoRA adapter (``LoraConfig`` with ``init="kaiming"`` or ``"gaussian"``, one ``r`` for
            all layers).
        min_rank: Smallest rank drawn (default 1); ranks below it are never trained.
        update: ``"last"`` (default: the paper's "frozen" mode, used by the authors' training script) or
            ``"nested"``: which of the first ``b`` ranks learn in a step.
        eval_rank: Rank for validation, test, predict and after fit; None (default) for the full ``r``.
        seed: Seed of the rank sampler (default 0).

    Raises:
        ValueError: Bad arguments (here), or at fit start: an adapter that is not plain LoRA (DoRA, LoHa, ...), an
            init other than kaiming/gaussian, per-layer ranks, ``min_rank`` or ``eval_rank`` above ``r``; raised
            before any training step.

    Example::

        config = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
        trainer = L.Trainer(callbacks=[LoraCallback(config), DyLoraSchedule(eval_rank=4)], max_steps=1000)
    """

    metric_prefix = "dylora"

    def __init__(
        self,
        adapter_name: str = "default",
        min_rank: int = 1,
        update: Literal["last", "nested"] = "last",
        eval_rank: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(adapter_name)
        for name, value in (("min_rank", min_rank), ("eval_rank", eval_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if update not in NESTED_UPDATES:
            raise ValueError(f"update must be one of {NESTED_UPDATES}, got {update!r}.")
        if eval_rank is not None and eval_rank < min_rank:
            raise ValueError(
                f"eval_rank={eval_rank} is below min_rank={min_rank}: ranks below min_rank are never trained. Lower "
                "min_rank, or evaluate at a rank >= min_rank."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.min_rank, self.update, self.eval_rank, self.seed = min_rank, update, eval_rank, seed
        self.max_rank: Optional[int] = None
        self.generator = torch.Generator().manual_seed(seed)
        self.rank: Optional[int] = None  # the rank of the current optimizer step
        self._drawn_for_step: Optional[int] = None
        self._module: Optional[nn.Module] = None
        self._left_at: Optional[tuple[Optional[int]]] = None  # (rank,) the model was left at by the last fit

    # ----- checks -----
    def _checked_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The adapted module, with the adapter checked for nested ranks (raises before anything changes)."""
        module = self.adapted_module(pl_module)
        nested_layers(module, self.adapter_name)
        return module

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module, self.rank, self._drawn_for_step = None, None, None
        module = self._checked_module(pl_module)
        ranks = {name: layer.lora_settings[self.adapter_name].r for name, layer in self.layers}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"DyLoraSchedule draws one rank for all layers, but adapter {self.adapter_name!r} has per-layer ranks "
                f"({dict(list(ranks.items())[:4])}); the ranks above the smallest would never train. Drop rank_pattern."
            )
        r = next(iter(ranks.values()))
        for name, value in (("min_rank", self.min_rank), ("eval_rank", self.eval_rank)):
            if value is not None and value > r:
                raise ValueError(
                    f"DyLoraSchedule({name}={value}) is above the rank r={r} of adapter {self.adapter_name!r}. Use "
                    f"{name} <= {r}, or a LoraConfig with a larger r."
                )
        self._module, self.max_rank = module, r
        self.generator.manual_seed(self.seed)  # each fit draws the same ranks; a resumed one restores its state

    # ----- ranks -----
    def _set_eval_rank(self, pl_module: pl.LightningModule) -> None:
        module = self.adapted_module(pl_module)
        if active_rank(module, self.adapter_name) != self.eval_rank:  # already there: nothing to change (or merged)
            set_active_rank(module, self.eval_rank, self.adapter_name)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._drawn_for_step != trainer.global_step:  # the first micro-batch of an optimizer step
            self.rank = int(torch.randint(self.min_rank, self.max_rank + 1, (1,), generator=self.generator))
            self._drawn_for_step = trainer.global_step
        set_active_rank(self._module, self.rank, self.adapter_name, update=self.update)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Outside a training step the model is at eval_rank: what other callbacks export or merge at train end (and
        # validation in between) sees the rank fit ends with. The next micro-batch sets the step's rank again.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._set_eval_rank(pl_module)

    @override
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        return {"rank": self.rank}

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_eval_rank(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_eval_rank_unless_chosen(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_eval_rank_unless_chosen(pl_module)

    def _set_eval_rank_unless_chosen(self, pl_module: pl.LightningModule) -> None:
        now = active_rank(self.adapted_module(pl_module), self.adapter_name)
        chosen = self._left_at is not None and now != self._left_at[0]
        if not chosen:  # the user's set_active_rank after fit wins
            self._set_eval_rank(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._module is not None:  # at eval_rank since the last step ended (merge_on_fit_end merged it there)
            self._left_at = (self.eval_rank,)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.rank is not None:  # interrupted while training: leave the model at eval_rank all the same
            self._set_eval_rank(pl_module)

    # ----- state -----
    @override
    def schedule_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rank": self.rank, "drawn_for_step": self._drawn_for_step}

    @override
    def restore_state(self, state: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.generator.set_state(state["generator"])
        self.rank, self._drawn_for_step = state["rank"], state["drawn_for_step"]

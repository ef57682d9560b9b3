"""A LoraCallback run on a 4-bit base resumes exactly from its adapter-only checkpoint (the base's bitsandbytes
state-dict extras, ``weight.absmax`` and the like, are not part of what the checkpoint restores)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("bitsandbytes")

from quantized_models import chain, chain_batch  # noqa: E402

from lightning_lora import LoraCallback, LoraConfig, QuantizationConfig, adapter_state_dict  # noqa: E402
from lightning_lora.core.quantization.quantized_weights import quantized_layers  # noqa: E402

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["first", "middle", "last"],
                    quantization=QuantizationConfig(bits=4, quant_type="nf4", double_quant=True))


class ChainModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = chain()

    def training_step(self, batch: list, batch_index: int) -> torch.Tensor:
        return (self.model(batch[0]) - 1.0).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _fit(epochs: int, checkpoints: Path | None = None, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = ChainModule()
    callbacks = [LoraCallback(CONFIG, submodule="model")]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=checkpoints is not None, callbacks=callbacks)
    trainer.fit(module, DataLoader(TensorDataset(chain_batch(rows=12)), batch_size=4), ckpt_path=ckpt_path)
    assert len(quantized_layers(module.model)) == 3
    return {key: value.clone() for key, value in adapter_state_dict(module.model).items()}


def test_a_qlora_run_resumes_bitwise_from_its_adapter_only_checkpoint(tmp_path: Path) -> None:
    uninterrupted = _fit(2)
    _fit(1, checkpoints=tmp_path)
    checkpoint = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["state_dict"]
    assert not any(key.endswith((".weight", "absmax")) and "lora" not in key for key in checkpoint)  # no base
    resumed = _fit(2, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], value) for key, value in uninterrupted.items())

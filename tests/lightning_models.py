"""Tiny LightningModules and data for the Lightning-layer tests and the multi-process scripts they launch."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_lora import LoraConfig, LoraMixin, inject_adapters, lora_param_groups

FEATURES, HIDDEN, OUTPUTS = 8, 16, 4


class TinyNet(nn.Module):
    """Two hidden linear layers and a head: small enough for multi-process CPU runs. With ``checkpointed`` the
    hidden layers are recomputed in backward (activation checkpointing)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, OUTPUTS)
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checkpointed:
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        recomputed = lambda layer, h: checkpoint(layer, h, use_reentrant=False)  # noqa: E731
        return self.head(torch.relu(recomputed(self.fc2, torch.relu(recomputed(self.fc1, x)))))


def lora_config(**overrides: Any) -> LoraConfig:
    values: dict[str, Any] = {"r": 4, "alpha": 8, "target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}
    return LoraConfig(**{**values, **overrides})


def dataloader(samples: int = 16, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(samples, FEATURES, generator=generator)
    y = torch.randn(samples, OUTPUTS, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class TwoRankOrder(Sampler):
    """The batches that two data-parallel ranks train on together: Lightning gives each rank a
    ``DistributedSampler(shuffle=True, seed=0)``; this yields both ranks' batches of one step as one batch."""

    def __init__(self, samples: int, batch_per_rank: int) -> None:
        self.samples, self.batch_per_rank, self.epoch = samples, batch_per_rank, 0

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        self.epoch += 1
        ranks = [order[rank::2] for rank in range(2)]
        for start in range(0, len(ranks[0]), self.batch_per_rank):
            yield [i for rank in ranks for i in rank[start : start + self.batch_per_rank]]

    def __len__(self) -> int:
        return self.samples // (2 * self.batch_per_rank)


def probe_inputs() -> torch.Tensor:
    return torch.randn(5, FEATURES, generator=torch.Generator().manual_seed(7))


class RegressionSteps:
    """training/validation steps shared by the modules below (mean squared error on ``self.model``)."""

    model: Optional[nn.Module]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.model(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.model(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(batch[0])


class BuiltInInit(RegressionSteps, L.LightningModule):
    """The model is built in ``__init__``; the optimizer holds the trainable parameters."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = TinyNet()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=self.lr))


class BuiltInConfigureModel(RegressionSteps, L.LightningModule):
    """The model is built in ``configure_model`` (the FSDP/DeepSpeed way), idempotently."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model: Optional[nn.Module] = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyNet()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=self.lr))


class MixinModule(LoraMixin, RegressionSteps, L.LightningModule):
    """LoraMixin with the model built in ``__init__``."""

    def __init__(self, **lora_arguments: Any) -> None:
        super().__init__(**lora_arguments)
        self.model = TinyNet()


def fully_shard_model(module: L.LightningModule) -> None:
    """FSDP2 as Lightning's ModelParallelStrategy expects it: each hidden layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh["data_parallel"]
    for layer in (module.model.fc1, module.model.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(module.model, mesh=mesh)


class ShardedBuiltInInit(BuiltInInit):
    """Built in ``__init__``, sharded with FSDP2 in ``configure_model`` (the adapters are already there)."""

    def configure_model(self) -> None:
        if not _is_sharded(self.model):
            fully_shard_model(self)


class ShardedMixinBuiltOnMeta(LoraMixin, RegressionSteps, L.LightningModule):
    """LoraMixin; the model is built on the meta device and sharded in ``configure_model``, with the adapters
    injected in between. The strategy materialises it (``to_empty`` and ``reset_parameters``)."""

    def __init__(self, **lora_arguments: Any) -> None:
        super().__init__(**lora_arguments)
        self.model: Optional[nn.Module] = None

    def configure_model(self) -> None:
        if self.model is None:
            build_on_meta_device(self)
            fully_shard_model(self)


def build_on_meta_device(module: L.LightningModule) -> None:
    """``module.model = TinyNet()`` on the meta device, with the adapters of the Trainer's LoRA callbacks."""
    with torch.device("meta"):
        module.model = TinyNet()
    inject_adapters(module)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def trainer_arguments(**overrides: Any) -> dict[str, Any]:
    """Quiet, deterministic Trainer settings for tests."""
    values: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    return {**values, **overrides}


def exit_cleanly() -> None:
    """End a multi-process script whose ``main()`` succeeded, on every rank: meet, destroy the process group, exit.

    Lightning keeps the process group after fit. Left to interpreter shutdown, the C++ objects behind it (gloo's
    threads, the TCP store's daemon on rank 0, DeepSpeed's backend) are destroyed in no set order, and a process
    aborts at random ("terminate called without an active exception", exit -6; seen in 2 of 9 suite runs under
    DeepSpeed even with the group destroyed first). So both ranks meet, the group is destroyed, and the process
    exits without that teardown once its output is flushed: everything the test reads is written by then.
    """
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

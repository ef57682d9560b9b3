"""A test-only DeepSpeed strategy for CPU processes.

Lightning's ``DeepSpeedStrategy`` refuses every accelerator but CUDA, yet DeepSpeed itself runs on CPU: with
``DS_ACCELERATOR=cpu`` it picks its CPU accelerator and talks over gloo. This subclass skips Lightning's CUDA and
device-index checks (nothing else), so the real ``LoraCallback`` runs under ZeRO-2/3 in CI without a GPU. Import it
before ``deepspeed`` is first imported: it sets the accelerator and keeps DeepSpeed from compiling its shared-memory
all-reduce op (about a minute of C++ build per fresh machine; gloo does the same job here).
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo collectives instead of a JIT-compiled shared-memory op."""
    import importlib

    # By module path: the attribute `deepspeed.comm.torch` is PyTorch itself (a star import shadows the submodule).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class CpuDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes joined by gloo (tests only: Lightning allows CUDA alone)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)
        skip_shared_memory_op()

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own raises for any accelerator but CUDA

    def setup_distributed(self) -> None:
        reset_seed()  # what DeepSpeedStrategy does, less its check that device indices equal local ranks
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # deepspeed.initialize reads device_rank from the index (None on plain cpu)

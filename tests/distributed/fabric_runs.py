"""Adapters in a Lightning Fabric loop, for tests/test_fabric.py: one process, or two FSDP2 ranks
(``ModelParallelStrategy``, gloo, CPU; Fabric re-launches this script for rank 1).

    python fabric_runs.py {single|fsdp2} OUT_DIR

Each run trains ``STEPS`` AdamW steps uninterrupted (``uninterrupted``), then ``STEPS // 2`` steps, an adapter-only
``fabric.save``, a fresh model and optimizer, ``fabric.load`` and the rest (``resumed``), and writes
``<run>-rank<r>.pt``: the full (gathered) adapter and residual base weights as rank ``r`` holds them. It also keeps
the adapter-only checkpoint, a full ``fabric.save`` for size, and a PEFT export of the uninterrupted model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning_models import TinyNet, exit_cleanly, lora_config
from svd_init_runs import ADAPTED
from torch import nn

from lightning_lora import adapter_checkpoint_filter, adapter_state_dict, apply_lora, lora_param_groups, save_adapter
from lightning_lora.core.common.distributed import full_tensor

STEPS, BATCH, INIT = 4, 8, "pissa_niter_2"


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 4, generator=generator))
            for _ in range(STEPS)]


def build(fabric: L.Fabric) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = apply_lora(TinyNet(), lora_config(init=INIT))  # before setup: the adapters shard with their layers
    model = fabric.setup_module(model)  # FSDP2 replaces the parameters: build the optimizer after
    return model, fabric.setup_optimizers(torch.optim.AdamW(lora_param_groups(model, lr=1e-2)))


def train(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    data = batches()
    for step in steps:
        inputs, targets = data[step]
        rows = inputs.shape[0] // fabric.world_size  # each rank its slice of the step's batch
        inputs, targets = (t[fabric.global_rank * rows:(fabric.global_rank + 1) * rows] for t in (inputs, targets))
        optimizer.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(inputs), targets))
        optimizer.step()


def snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    weights = {f"{name}.weight": getattr(model.module, name).weight for name in ADAPTED}
    return {key: {k: full_tensor(v.detach()).cpu().clone() for k, v in state.items()}
            for key, state in (("adapter", adapter_state_dict(model.module)), ("weights", weights))}


def main() -> None:
    kind, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if kind == "single":
        fabric = L.Fabric(accelerator="cpu", devices=1)
    else:
        from lightning.fabric.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import fully_shard

        def parallelize(model: nn.Module, mesh) -> nn.Module:
            for name in ADAPTED:
                fully_shard(getattr(model, name), mesh=mesh["data_parallel"])
            return fully_shard(model, mesh=mesh["data_parallel"])

        strategy = ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)  # Fabric filters full checkpoints only
        fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    rank = fabric.global_rank

    model, optimizer = build(fabric)
    train(fabric, model, optimizer, range(STEPS))
    torch.save(snapshot(model), out / f"{kind}-uninterrupted-rank{rank}.pt")
    save_adapter(model.module, out / f"{kind}-peft")
    fabric.save(out / f"{kind}-full.ckpt", {"model": model, "optimizer": optimizer})

    model, optimizer = build(fabric)
    train(fabric, model, optimizer, range(STEPS // 2))
    state = {"model": model, "optimizer": optimizer, "step": STEPS // 2}
    fabric.save(out / f"{kind}-adapter.ckpt", state, filter={"model": adapter_checkpoint_filter(model)})
    model, optimizer = build(fabric)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(out / f"{kind}-adapter.ckpt", state, strict=False)
    train(fabric, model, optimizer, range(state["step"], STEPS))
    torch.save(snapshot(model), out / f"{kind}-resumed-rank{rank}.pt")


if __name__ == "__main__":
    main()
    exit_cleanly()

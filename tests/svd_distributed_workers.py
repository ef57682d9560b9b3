"""Two-process (gloo, CPU) workers for tests/test_svd_init_distributed.py.

Kept apart from the test module so spawned processes import only torch and lightning_lora. Each worker writes what
the test compares (full state dicts, on rank 0 or per rank) under ``out_dir``.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lightning_lora import LoraConfig, apply_lora, initialize_pending_adapters

WORLD_SIZE = 2
BATCH = 8
STEPS = 2
LR = 0.05


def tiny_mlp(seed: int = 0) -> nn.Module:
    """Three linear layers of different shapes (every adapter sees a different SVD)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 12), nn.GELU(), nn.Linear(12, 6))


def svd_config(init: str = "pissa_niter_2") -> LoraConfig:
    return LoraConfig(r=4, alpha=8, init=init, target_modules=["0", "2", "4"])


def batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 16, generator=generator), torch.randn(BATCH, 6, generator=generator)


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int = STEPS) -> None:
    """Plain SGD on the mean squared error; a data-parallel rank passes its slice of the batch."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker: Callable, out_dir: str, *args: object) -> None:
    """Run ``worker(rank, out_dir, *args)`` in two processes joined by a gloo process group."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(worker, free_port(), out_dir, args), nprocs=WORLD_SIZE, join=True)


def _entry(rank: int, worker: Callable, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        worker(rank, out_dir, *args)
        dist.barrier()  # both ranks are done before either tears its connections down
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: the C++ objects behind the group (and DeepSpeed's backend) destroyed there in no set
    # order aborted a worker at random ("terminate called without an active exception"; tests/lightning_models.py,
    # exit_cleanly). Only reached on success; everything the test reads is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_slice(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor.chunk(WORLD_SIZE)[rank]


def fsdp2_meta_worker(rank: int, out_dir: str, init: str) -> None:
    """FSDP2 flow: build on meta, inject (init pending), shard, materialise, load base weights, initialise (recording
    the progress lines of each rank), train."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    base_state = tiny_mlp().state_dict()
    with torch.device("meta"):
        model = tiny_mlp()
    apply_lora(model, svd_config(init))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()  # what Lightning's materialisation does; SVD inits stay pending
    set_model_state_dict(model, base_state, options=StateDictOptions(full_state_dict=True, strict=False))
    torch.manual_seed(1000 + rank)  # the init must not depend on the caller's RNG
    progress: list[str] = []
    initialized = initialize_pending_adapters(model, progress=progress.append, progress_after_s=0.0)
    torch.save(progress, os.path.join(out_dir, f"progress_rank{rank}.pt"))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    init_state = get_model_state_dict(model, options=options)
    inputs, targets = batch()
    train(model, _rank_slice(inputs, rank), _rank_slice(targets, rank))
    trained_state = get_model_state_dict(model, options=options)
    if rank == 0:
        torch.save({"initialized": initialized, "init": init_state, "trained": trained_state},
                   os.path.join(out_dir, "fsdp2.pt"))


def fsdp1_meta_worker(rank: int, out_dir: str, init: str) -> None:
    """FSDP1 flow: build on meta, inject, wrap (FSDP materialises with reset_parameters), load weights, initialise."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    base_state = tiny_mlp().state_dict()
    with torch.device("meta"):
        model = tiny_mlp()
    apply_lora(model, svd_config(init))
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True), torch.no_grad():
        for key, value in base_state.items():
            model.get_parameter(key).copy_(value)
    torch.manual_seed(1000 + rank)
    initialized = initialize_pending_adapters(wrapped)
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"initialized": initialized, "init": init_state}, os.path.join(out_dir, "fsdp1.pt"))



def deepspeed_zero3_worker(rank: int, out_dir: str, inits: list[str]) -> None:
    """ZeRO-3 core flow, no Lightning, for each init: build the base partitioned under ``zero.Init``, inject with the
    init pending, load the base weights into the partitions, initialise (before ``deepspeed.initialize`` takes its
    copies), then train through the engine on this rank's slice. Rank 0 saves the gathered states."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    import importlib

    import deepspeed

    from lightning_lora import register_zero3_external_parameters

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see tests/distributed/cpu_deepspeed
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group _entry made
    config = {"train_micro_batch_size_per_gpu": BATCH // WORLD_SIZE, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    base_state = tiny_mlp().state_dict()
    inputs, targets = batch()
    results = {}
    for init in inits:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = tiny_mlp()
        apply_lora(model, svd_config(init), initialize=False)
        register_zero3_external_parameters(model)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
            for key, value in base_state.items():
                model.get_parameter(key).copy_(value)
        torch.manual_seed(1000 + rank)  # the init must not depend on the caller's RNG
        initialized = initialize_pending_adapters(model)
        init_state = _gathered_state(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        for _ in range(STEPS):
            loss = nn.functional.mse_loss(engine(_rank_slice(inputs, rank)), _rank_slice(targets, rank))
            engine.backward(loss)
            engine.step()
        results[init] = {"initialized": initialized, "init": init_state, "trained": _gathered_state(model)}
        engine.destroy()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "deepspeed.pt"))


def _gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {key: value.detach().clone() for key, value in model.state_dict().items()}

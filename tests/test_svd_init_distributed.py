"""SVD inits on sharded models in two real processes (gloo, CPU), with plain torch.distributed: meta-device models
under FSDP2 (fully_shard, DTensor) and FSDP1 initialise once their weights are loaded, to the single-process
result, and FSDP2 trains like one process. DeepSpeed ZeRO-3 needs CUDA and is skipped without it. (DDP and FSDP2
through Lightning: test_svd_init_lightning.py.)

Each distributed run is spawned once per module; several tests read its results."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import svd_distributed_workers as workers
from lightning_lora import apply_lora, initialize_pending_adapters, lora_layers

INIT = "pissa_niter_2"  # randomised: ranks agree only because the projection is seeded the same everywhere


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    """The reference: initial and trained state of one process that sees the whole batch."""
    model = apply_lora(workers.tiny_mlp(), workers.svd_config(INIT))
    initial = copy.deepcopy(model.state_dict())
    workers.train(model, *workers.batch())
    return {"init": initial, "trained": model.state_dict()}


def _spawned(worker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp(worker.__name__)
    workers.spawn(worker, str(out_dir), INIT)
    return out_dir


@pytest.fixture(scope="module")
def fsdp2_dir(tmp_path_factory) -> Path:
    return _spawned(workers.fsdp2_meta_worker, tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp2_run(fsdp2_dir) -> dict:
    return torch.load(fsdp2_dir / "fsdp2.pt")


def _assert_states_close(state: dict, reference: dict, atol: float = 1e-6) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=atol, rtol=1e-5, msg=key)


def test_progress_lines_come_from_rank_zero_only(fsdp2_dir):
    rank0, rank1 = (torch.load(fsdp2_dir / f"progress_rank{rank}.pt") for rank in (0, 1))
    assert rank0 and rank1 == []


def _adapted_layers() -> int:
    return len(lora_layers(apply_lora(workers.tiny_mlp(), workers.svd_config(INIT))))


def test_fsdp2_meta_model_initialises_once_its_weights_are_loaded_like_one_process(fsdp2_run, single_process):
    assert fsdp2_run["initialized"] == _adapted_layers()
    _assert_states_close(fsdp2_run["init"], single_process["init"])


def test_fsdp2_training_equals_one_process_on_the_whole_batch(fsdp2_run, single_process):
    _assert_states_close(fsdp2_run["trained"], single_process["trained"])


def test_fsdp1_meta_model_initialises_once_its_weights_are_loaded_like_one_process(tmp_path_factory, single_process):
    result = torch.load(_spawned(workers.fsdp1_meta_worker, tmp_path_factory) / "fsdp1.pt")
    assert result["initialized"] == _adapted_layers()
    _assert_states_close(result["init"], single_process["init"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed ZeRO-3 needs CUDA")
def test_deepspeed_zero3_partitioned_weights_initialise_like_one_process():
    deepspeed = pytest.importorskip("deepspeed")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(workers.free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl")
    reference = apply_lora(workers.tiny_mlp().cuda(), workers.svd_config(INIT))
    base_state = workers.tiny_mlp().state_dict()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = workers.tiny_mlp()
    apply_lora(model, workers.svd_config(INIT), initialize=False)
    model.cuda()
    for name, layer in lora_layers(model):
        with deepspeed.zero.GatheredParameters([layer.weight], modifier_rank=0):
            layer.weight.data.copy_(base_state[f"{name}.weight"])
    assert initialize_pending_adapters(model) == _adapted_layers()
    for name, layer in lora_layers(model):
        with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=None):
            expected = reference.get_submodule(name)
            torch.testing.assert_close(layer.weight, expected.weight, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.lora_A["default"], expected.lora_A["default"], atol=1e-5, rtol=1e-5)

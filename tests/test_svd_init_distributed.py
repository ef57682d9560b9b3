"""SVD inits on sharded models in two real processes (gloo, CPU), with plain torch.distributed: meta-device models
under FSDP2 (fully_shard, DTensor) and FSDP1 initialise once their weights are loaded, to the single-process
result, and FSDP2 trains like one process; so do DeepSpeed ZeRO-3 partitions (DeepSpeed's CPU accelerator, gloo).
(DDP and FSDP2 through Lightning: test_svd_init_lightning.py; DeepSpeed through Lightning: test_deepspeed_cpu.py.)

Each distributed run is spawned once per module; several tests read its results."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import svd_distributed_workers as workers
from numerics import assert_parity
from lightning_lora import apply_lora, lora_layers

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


def _assert_states_close(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert_parity(state[key], value, msg=key)


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


SVD_INITS = ["pissa", "pissa_niter_2", "milora", "olora"]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out_dir = tmp_path_factory.mktemp("deepspeed_zero3_worker")
    workers.spawn(workers.deepspeed_zero3_worker, str(out_dir), SVD_INITS)
    return torch.load(out_dir / "deepspeed.pt")


@pytest.mark.slow
@pytest.mark.parametrize("init", SVD_INITS)
def test_deepspeed_zero3_partitioned_weights_initialise_and_train_like_one_process(deepspeed_runs, init: str):
    # Two CPU processes (DeepSpeed's CPU accelerator, gloo): the init runs on the gathered partitions before
    # deepspeed.initialize takes its copies, so the engine trains from it.
    model = apply_lora(workers.tiny_mlp(), workers.svd_config(init))
    initial = copy.deepcopy(model.state_dict())
    workers.train(model, *workers.batch())
    result = deepspeed_runs[init]
    assert result["initialized"] == _adapted_layers()
    _assert_states_close(result["init"], initial)
    _assert_states_close(result["trained"], model.state_dict())

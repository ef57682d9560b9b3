"""SVD inits through the Lightning callback, for real with two processes (launches of
tests/distributed/svd_init_runs.py): DDP and FSDP2 (ModelParallelStrategy) on CPU/gloo; FSDP1 and DeepSpeed ZeRO-3
on two GPUs, skipped without them. Every rank holds the same adapter and residual base weights, training equals one
process on the same data, and resuming restores instead of re-initialising."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from lightning_models import BuiltInInit, TwoRankOrder, dataloader, trainer_arguments
from numerics import assert_parity

from lightning_lora import LoraCallback, adapter_state_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "svd_init_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
import svd_init_runs as runs  # noqa: E402

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
DEEPSPEED = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not L.pytorch.strategies.deepspeed._DEEPSPEED_AVAILABLE,
    reason="needs two CUDA devices and deepspeed",
)
GROUP = {"ddp": "cpu", "fsdp2": "cpu", "fsdp1": "fsdp1", "deepspeed": "deepspeed"}  # kind -> launch
CPU_KINDS = ["ddp", "fsdp2"]
KINDS = [*CPU_KINDS, pytest.param("fsdp1", marks=TWO_GPUS), pytest.param("deepspeed", marks=DEEPSPEED)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory):
    """``launched(kind)``: the output directory of the launch that ran ``kind`` (each launch runs once)."""
    outputs: dict[str, Path] = {}

    def launch(kind: str) -> Path:
        group = GROUP[kind]
        if group not in outputs:
            out = tmp_path_factory.mktemp(f"svd_init_runs_{group}")
            python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
            env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
            for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(variable, None)
            result = subprocess.run([sys.executable, str(SCRIPT), group, str(out)], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                pytest.fail(f"svd_init_runs.py {group} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                            f"{result.stderr[-6000:]}")
            outputs[group] = out
        return outputs[group]

    return launch


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    """One process that sees, at every step, the samples both ranks saw."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = BuiltInInit()
    trainer = L.Trainer(**trainer_arguments(max_epochs=runs.EPOCHS, callbacks=[LoraCallback(runs.svd_config())]))
    data = dataloader()
    trainer.fit(module, DataLoader(data.dataset, batch_sampler=TwoRankOrder(len(data.dataset), data.batch_size)))
    weights = {f"model.{name}.weight": getattr(module.model, name).weight.detach() for name in runs.ADAPTED}
    return {"adapter": adapter_state_dict(module), "weights": weights}


def _load(launched, kind: str, run: str, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(launched(kind) / f"{kind}-{run}-rank{rank}.pt")


def _assert_close(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert_parity(state[key], value, msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_every_rank_holds_the_same_adapter_and_residual_weights(launched, kind: str) -> None:
    rank0, rank1 = (_load(launched, kind, "uninterrupted", rank) for rank in (0, 1))
    assert any(".lora_init_A." in key for key in rank0["adapter"])
    for part in ("adapter", "weights"):
        assert all(torch.equal(rank1[part][key], value) for key, value in rank0[part].items()), part


@pytest.mark.parametrize("kind", CPU_KINDS)  # GPU numerics are not the CPU reference's
def test_training_equals_one_process_on_the_same_data(launched, kind: str, single_process) -> None:
    result = _load(launched, kind, "uninterrupted", 0)
    _assert_close(result["weights"], single_process["weights"])  # the same residual base weights
    _assert_close(result["adapter"], single_process["adapter"])


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_restores_adapter_and_residual_exactly(launched, kind: str) -> None:
    # The DDP resume ran with every SVD routine failing: it restored rather than re-ran the init.
    uninterrupted, resumed = (_load(launched, kind, run, 0) for run in ("uninterrupted", "resumed"))
    for part in ("adapter", "weights"):
        assert all(torch.equal(resumed[part][key], value) for key, value in uninterrupted[part].items()), part

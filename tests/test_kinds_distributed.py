"""LoHa, LoKr, OFT, BOFT, VeRA, VB-LoRA, AdaLoRA and DoRA adapters, ReLoRA, activation checkpointing and a 4-bit base
(QLoRA, FSDP-QLoRA) with two processes, for real (one launch of tests/distributed/kind_runs.py): DDP and FSDP2
(ModelParallelStrategy) on CPU/gloo. Every rank holds the same adapter (AdaLoRA: the same ranks; ReLoRA: the same
folded base), training equals one process on the same batches, resuming from an adapter-only checkpoint is exact, and
the merged export of a 4-bit base gathered from shards equals one process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning_models import BuiltInInit, dataloader, trainer_arguments
from numerics import RELATIVE_TOLERANCE, assert_parity
from torch.utils.data import DataLoader

from lightning_lora import load_merged_state_dict, save_merged_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "kind_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
import kind_runs as runs  # noqa: E402

RUNS = [(kind, strategy) for kind in runs.CONFIGS for strategy in runs.STRATEGIES.get(kind, ("ddp", "fsdp2"))]
# A tensor each kind's adapter must hold (the runs really trained that kind).
MARKERS = {"loha": "hada_w1_a", "vera": "vera_lambda_d", "lokr": "lokr_w1", "oft": "oft_R", "adalora": "lora_E",
           "relora": "lora_A", "lora-checkpointed": "lora_A", "boft": "boft_R",
           "dora": "lora_magnitude", "qlora": "lora_A", "dora-qlora": "lora_magnitude",
           "vblora": "vblora_vector_bank"}
QUANTIZED_RUNS = [(kind, strategy) for kind, strategy in RUNS if runs.CONFIGS[kind].quantization is not None]
# Training compares two processes with one: each step's gradients are summed in another order (per rank, then across
# ranks), and the optimizer steps carry that rounding forward (measured: up to 9e-6 of a tensor's largest value, on
# ReLoRA's folded fc2 weight). The bound is ten times float32's parity bound, still far below a wrong update.
TRAINED_REL = 10 * RELATIVE_TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kind_runs")
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"kind_runs.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """One process per kind on whole batches (both ranks' halves of each step, in order), without activation
    checkpointing: checkpointed runs must give the same numbers. A kind on a 4-bit base also has its merged export,
    under ``<kind>-merged``."""
    torch.set_num_threads(1)
    results = {}
    for kind in runs.CONFIGS:
        L.seed_everything(0)
        module = BuiltInInit()
        trainer = L.Trainer(**trainer_arguments(max_epochs=runs.EPOCHS, callbacks=runs.callbacks_of(kind)))
        whole = DataLoader(dataloader().dataset, batch_size=2 * runs.BATCH_PER_RANK, shuffle=False)
        trainer.fit(module, _interleaved(whole))
        results[kind] = runs.snapshot(module)
        if runs.CONFIGS[kind].quantization is not None:
            merged = save_merged_model(module.model, tmp_path_factory.mktemp(kind), dequantize=True)
            results[f"{kind}-merged"] = load_merged_state_dict(merged)
    return results


def _interleaved(loader: DataLoader) -> DataLoader:
    """The samples of each global step in the order ``DistributedSampler(shuffle=False)`` splits them: rank 0 takes
    the even positions, rank 1 the odd ones; a whole batch is the two halves."""
    data = loader.dataset
    order = list(range(0, len(data), 2)) + list(range(1, len(data), 2))
    half = runs.BATCH_PER_RANK
    batches = [
        order[start:start + half] + order[len(data) // 2 + start:len(data) // 2 + start + half]
        for start in range(0, len(data) // 2, half)
    ]
    return DataLoader(data, batch_sampler=batches)


def _load(out: Path, kind: str, strategy: str, run: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{kind}-{strategy}-{run}-rank{rank}.pt")


@pytest.mark.parametrize("kind, strategy", RUNS)
def test_every_rank_holds_the_same_adapter(out_dir: Path, kind: str, strategy: str) -> None:
    rank0, rank1 = (_load(out_dir, kind, strategy, "uninterrupted", rank) for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and any(f".{MARKERS[kind]}." in k for k in rank0)
    assert all(torch.equal(rank1[key], value) for key, value in rank0.items())


@pytest.mark.parametrize("kind, strategy", RUNS)
def test_two_processes_train_like_one_on_the_same_batches(out_dir: Path, single_process, kind: str,
                                                          strategy: str) -> None:
    trained = _load(out_dir, kind, strategy, "uninterrupted", 0)
    reference = single_process[kind]
    assert trained.keys() == reference.keys()
    for key, value in reference.items():
        assert_parity(trained[key], value, rel=TRAINED_REL, msg=key)


@pytest.mark.parametrize("kind, strategy", RUNS)
def test_resume_from_an_adapter_only_checkpoint_is_exact(out_dir: Path, kind: str, strategy: str) -> None:
    for rank in (0, 1):
        uninterrupted = _load(out_dir, kind, strategy, "uninterrupted", rank)
        resumed = _load(out_dir, kind, strategy, "resumed", rank)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[key], value) for key, value in uninterrupted.items())


@pytest.mark.parametrize("kind, strategy", QUANTIZED_RUNS)
def test_the_merged_export_of_a_4bit_base_is_gathered_dequantised_like_one_process(
    out_dir: Path, single_process, kind: str, strategy: str
) -> None:
    written = load_merged_state_dict(out_dir / f"{kind}-{strategy}-merged")
    reference = single_process[f"{kind}-merged"]
    assert written.keys() == reference.keys() == BuiltInInit().model.state_dict().keys()
    assert all(value.dtype == torch.float32 for value in written.values())
    for key, value in reference.items():
        assert_parity(written[key], value, rel=TRAINED_REL, msg=key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_adalora_ranks_and_relora_restarts_are_the_same_decisions_as_one_process(
    out_dir: Path, single_process, strategy: str
) -> None:
    def ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        return {key: int((value != 0).sum()) for key, value in tensors.items() if ".lora_E." in key}

    adalora = _load(out_dir, "adalora", strategy, "uninterrupted", 1)
    assert ranks(adalora) == ranks(single_process["adalora"]) and sum(ranks(adalora).values()) == 4  # pruned 8 -> 4
    relora = _load(out_dir, "relora", strategy, "resumed", 1)
    L.seed_everything(0)
    initial = BuiltInInit().model.fc1.weight  # the restarts moved the base, the same way in every process
    assert not torch.allclose(relora["model.fc1.weight"], initial)
    assert_parity(relora["model.fc1.weight"], single_process["relora"]["model.fc1.weight"], rel=TRAINED_REL)

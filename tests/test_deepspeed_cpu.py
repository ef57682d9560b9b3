"""DeepSpeed for real, on CPU: two processes (gloo) through the real ``LoraCallback`` under ZeRO-2 and ZeRO-3
(tests/distributed/deepspeed_runs.py, one launch for the whole module). SVD inits run after DeepSpeed has built its
engine, whose optimizer holds its own full-precision copies of the adapter tensors: the first step must not bring
back the zeros those copies held. Every rank holds the same adapter and residual weights, training equals one process
on the same samples, an adapter-only checkpoint resumes exactly, and merged exports equal the trained model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning_models import BuiltInInit, TwoRankOrder, dataloader, lora_config, probe_inputs, trainer_arguments
from numerics import assert_parity
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_lora import LoraCallback, adapter_state_dict, apply_lora

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "deepspeed_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
import deepspeed_runs as runs  # noqa: E402
from svd_init_runs import ADAPTED  # noqa: E402

TRAINED = [name for name, *_ in runs.TRAINED]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed_runs")
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for variable in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"deepspeed_runs.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-6000:]}")
    return out


def _load(out: Path, name: str, rank: int = 0) -> dict:
    return torch.load(out / f"{name}-rank{rank}.pt")


def _single_process(init: str) -> dict[str, dict[str, torch.Tensor]]:
    """One process that sees, at every step, the samples both ranks saw."""
    L.seed_everything(0)
    module = BuiltInInit()
    trainer = L.Trainer(**trainer_arguments(max_epochs=runs.EPOCHS, callbacks=[LoraCallback(lora_config(init=init))]))
    data = dataloader()
    trainer.fit(module, DataLoader(data.dataset, batch_sampler=TwoRankOrder(len(data.dataset), data.batch_size)))
    weights = {f"model.{name}.weight": getattr(module.model, name).weight.detach() for name in ADAPTED}
    return {"adapter": adapter_state_dict(module), "weights": weights}


@pytest.mark.parametrize("name", TRAINED)
def test_every_rank_holds_the_same_adapter_and_residual_weights(launched: Path, name: str) -> None:
    rank0, rank1 = (_load(launched, name, rank) for rank in (0, 1))
    for part in ("adapter", "weights"):
        assert rank0[part].keys() == rank1[part].keys()
        assert all(torch.equal(rank1[part][key], value) for key, value in rank0[part].items()), part


# A random init is drawn after Lightning re-seeds each rank in setup_distributed: equal on every rank, but not one
# process's draw; SVD inits are deterministic.
@pytest.mark.parametrize("name", [name for name, _, init, _ in runs.TRAINED if init != "gaussian"])
def test_training_equals_one_process_on_the_same_samples(launched: Path, name: str) -> None:
    # Without refreshing DeepSpeed's optimizer copies after the init, the first step brought back the zeros they held
    # (lora_A 0.35-0.87 off the one-process run after two epochs, every SVD init, ZeRO-2 and ZeRO-3).
    init = next(init for run, _, init, _ in runs.TRAINED if run == name)
    result, reference = _load(launched, name), _single_process(init)
    for part in ("weights", "adapter"):  # the residual base weights, then the trained adapter
        assert result[part].keys() == reference[part].keys()
        for key, value in reference[part].items():
            assert_parity(result[part][key], value, msg=key)


@pytest.mark.parametrize("name", [name for name, *_ in runs.RESUMED])
def test_an_adapter_only_checkpoint_resumes_exactly(launched: Path, name: str) -> None:
    uninterrupted, resumed = _load(launched, name), _load(launched, f"{name}-resumed")
    for part in ("adapter", "weights"):
        assert all(torch.equal(resumed[part][key], value) for key, value in uninterrupted[part].items()), part
    # exclude_frozen_parameters: the model states hold what trains (adapters, modules_to_save), no frozen base weight.
    states = next((launched / f"{name}-checkpoints" / "epochepoch=0.ckpt").rglob("*model_states.pt"))
    saved = set(torch.load(states, weights_only=False)["module"])
    assert saved == {f"model.{layer}.lora_{factor}.default" for layer in ADAPTED for factor in "AB"} | {
        "model.head.weight", "model.head.bias"}


def test_the_summary_counts_partitioned_parameters(launched: Path) -> None:
    expected = str(_summary_of_one_process())
    assert _load(launched, "zero3-pissa")["summary"] == expected
    assert _load(launched, "zero2-pissa")["summary"] == expected


def _summary_of_one_process():
    from lightning_lora import trainable_parameters_summary

    module = BuiltInInit()
    module.model = apply_lora(module.model, lora_config(init="pissa"))
    return trainable_parameters_summary(module)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_merged_export_equals_the_trained_model(launched: Path, stage: int) -> None:
    # The merged run trained exactly like zero<stage>-pissa (same seed and samples) before merging.
    trained = _load(launched, f"zero{stage}-pissa")
    L.seed_everything(0)
    reference = BuiltInInit()
    reference.model = apply_lora(reference.model, lora_config(init="pissa"))
    missing = reference.load_state_dict({**trained["adapter"], **trained["weights"]}, strict=False).missing_keys
    assert all(".bias" in key or "head" in key or "lora_init" in key for key in missing), missing
    merged = BuiltInInit()  # both exports hold the LightningModule's keys (model.fc1.weight, ...)
    merged.load_state_dict(load_file(launched / f"zero{stage}-pissa-merged" / "model.safetensors"))
    with torch.no_grad():
        assert_parity(merged.model(probe_inputs()), reference.model(probe_inputs()))


def test_a_vblora_bank_shared_by_partitioned_layers_trains_alike_on_every_rank(launched: Path) -> None:
    """ZeRO-3 partitions the bank, held once by the module containing both adapted layers, with everything else."""
    rank0, rank1 = (_load(launched, "zero3-vblora", rank) for rank in (0, 1))
    banks = [key for key in rank0["adapter"] if "vblora_vector_bank" in key]
    assert banks == ["model.vblora_vector_bank.default"]
    assert rank0["adapter"].keys() == rank1["adapter"].keys()
    assert all(torch.equal(rank1["adapter"][key], value) for key, value in rank0["adapter"].items())
    moved = [key for key, value in rank0["adapter"].items() if not torch.equal(value, rank0["initial"][key])]
    assert moved == list(rank0["adapter"])  # the bank and every layer's logits trained

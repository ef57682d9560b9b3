"""Data-driven inits (CorDA, EVA) through LoraCallback(calibration_batches=N): calibrated at train start on the first
N train batches exactly as calibrate_adapters on those batches, before the first optimizer step, never again when
resuming; EVA's new ranks reach the optimizer and checkpoints. One process here; two-process DDP and FSDP2
(ModelParallelStrategy) CorDA runs are launched from tests/distributed/calibration_runs.py."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_models import (
    FEATURES,
    OUTPUTS,
    BuiltInInit,
    MixinModule,
    dataloader,
    lora_config,
    probe_inputs,
    trainer_arguments,
)
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora.core.inits.corda as corda
import lightning_lora.core.inits.eva as eva
from lightning_lora import (
    EvaConfig,
    LoraCallback,
    adapter_state_dict,
    apply_lora,
    calibrate_adapters,
    get_lora_config,
    load_lora_checkpoint,
    lora_layers,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "calibration_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
import calibration_runs as runs  # noqa: E402

N = 2


class AdapterAtTrainStart(Callback):
    """Records the adapter state (and the base weights) when training starts, after LoraCallback's calibration."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}


def fit(config, data, epochs: int = 1, callbacks=(), ckpt_path=None, val=None, **trainer_overrides) -> tuple[Any, Any]:
    torch.manual_seed(0)
    module = BuiltInInit()
    lora = LoraCallback(config, calibration_batches=N)
    probe = AdapterAtTrainStart()
    trainer = L.Trainer(**trainer_arguments(max_epochs=epochs, callbacks=[lora, probe, *callbacks],
                                            **trainer_overrides))  # fmt: skip
    trainer.fit(module, data, val, ckpt_path=ckpt_path)
    return module, probe


def core_calibration(config, data) -> dict[str, torch.Tensor]:
    """The same adapter calibrated with calibrate_adapters on the loader's first N batches."""
    torch.manual_seed(0)
    module = apply_lora(BuiltInInit(), config)
    calibrate_adapters(module, list(islice(data, N)), forward=lambda m, batch: m.training_step(batch, 0))
    return module.state_dict()


@pytest.mark.parametrize("init", ["corda_ipm", "corda_kpm"])
def test_corda_is_calibrated_at_train_start_like_calibrate_adapters_on_the_first_batches(init: str) -> None:
    config, data = lora_config(init=init), dataloader()
    module, probe = fit(config, data, num_sanity_val_steps=2, val=dataloader(8))  # sanity check passes
    expected = core_calibration(config, data)
    assert probe.state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(probe.state[key], value), key
    trained = adapter_state_dict(module)
    assert not torch.equal(trained["model.fc1.lora_B.default"], expected["model.fc1.lora_B.default"])  # trains
    assert torch.equal(trained["model.fc1.lora_init_A.default"], expected["model.fc1.lora_init_A.default"])


def test_resuming_restores_instead_of_calibrating_again(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, data = lora_config(init="corda_kpm"), dataloader()
    uninterrupted, _ = fit(config, data, epochs=2)
    fit(config, data, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="e0")], enable_checkpointing=True)
    monkeypatch.setattr(corda.CovarianceCollector, "add", lambda *args: pytest.fail("calibrated again"))
    resumed, _ = fit(config, data, epochs=2, ckpt_path=tmp_path / "e0.ckpt")
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def eva_config() -> Any:
    return lora_config(init="eva", r=3, alpha=6, eva_config=EvaConfig(rho=2.0))


def eva_data() -> DataLoader:
    """Inputs with two dominant directions (so EVA moves ranks between the layers), 16 rows per batch."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, FEATURES, generator=generator) * torch.tensor([6.0, 3.0, 1, 1, 1, 1, 1, 1])
    return DataLoader(TensorDataset(x, torch.randn(64, OUTPUTS, generator=generator)), batch_size=16)


def test_eva_ranks_reach_the_optimizer_and_the_saved_config(tmp_path) -> None:
    data = eva_data()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="e0")
    module, probe = fit(eva_config(), data, callbacks=[checkpoint], enable_checkpointing=True)
    expected = core_calibration(eva_config(), data)
    ranks = {name: layer.lora_A["default"].shape[0] for name, layer in lora_layers(module)}
    assert sorted(ranks.values()) != [3, 3]  # redistributed
    for key, value in expected.items():
        assert torch.equal(probe.state[key], value), key
    adapter = {id(p) for name, p in module.named_parameters() if "lora_" in name}
    assert adapter <= probe.optimized  # the resized tensors are the ones optimised
    saved = torch.load(tmp_path / "e0.ckpt", weights_only=False)["callbacks"]
    assert next(iter(saved.values()))["config"]["rank_pattern"]


def test_resumed_eva_run_takes_its_ranks_from_the_checkpoint(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = eva_data()
    uninterrupted, _ = fit(eva_config(), data, epochs=2)
    fit(eva_config(), data, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="e0")], enable_checkpointing=True)
    monkeypatch.setattr(eva, "eva_components", lambda *args: pytest.fail("calibrated again"))
    resumed, _ = fit(eva_config(), data, epochs=2, ckpt_path=tmp_path / "e0.ckpt")  # the user's original config
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("init", ["corda_kpm", "eva"])
def test_load_lora_checkpoint_brings_back_the_trained_module_without_data(init: str, tmp_path, monkeypatch) -> None:
    config, data = (eva_config(), eva_data()) if init == "eva" else (lora_config(init=init), dataloader())
    trained, _ = fit(config, data, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="e0")],
                     enable_checkpointing=True)  # fmt: skip
    monkeypatch.setattr(corda.CovarianceCollector, "add", lambda *args: pytest.fail("calibrated again"))
    monkeypatch.setattr(eva, "eva_components", lambda *args: pytest.fail("calibrated again"))
    torch.manual_seed(0)  # the frozen base comes from the seed (adapter-only checkpoint)
    loaded = load_lora_checkpoint(BuiltInInit, tmp_path / "e0.ckpt")
    torch.testing.assert_close(loaded.model(probe_inputs()), trained.model(probe_inputs()), atol=0, rtol=0)


def test_lora_mixin_calibrates_and_loads_from_its_checkpoint(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    trained = MixinModule(lora_config=eva_config(), calibration_batches=N)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="e0")
    L.Trainer(**trainer_arguments(max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True)).fit(
        trained, eva_data()
    )
    assert get_lora_config(trained).rank_pattern  # calibrated, ranks moved
    monkeypatch.setattr(eva, "eva_components", lambda *args: pytest.fail("calibrated again"))
    torch.manual_seed(0)
    loaded = MixinModule.load_from_checkpoint(tmp_path / "e0.ckpt", lora_config=eva_config(), calibration_batches=N)
    torch.testing.assert_close(loaded.model(probe_inputs()), trained.model(probe_inputs()), atol=0, rtol=0)


def test_calibration_batches_are_required_for_a_data_init_and_refused_without_one() -> None:
    with pytest.raises(ValueError, match="calibration_batches=16"):
        LoraCallback(lora_config(init="corda_ipm"))
    with pytest.raises(ValueError, match="reads no data"):
        LoraCallback(lora_config(), calibration_batches=4)


def test_manual_optimization_needs_its_own_calibration_forward() -> None:
    class Manual(BuiltInInit):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    trainer = L.Trainer(**trainer_arguments(max_epochs=1,
                                            callbacks=[LoraCallback(lora_config(init="corda_ipm"),
                                                                    calibration_batches=N)]))  # fmt: skip
    with pytest.raises(ValueError, match="calibration_forward"):
        trainer.fit(Manual(), dataloader())


def test_eva_redistribution_under_ddp_names_the_fix() -> None:
    module = apply_lora(BuiltInInit(), eva_config())
    with pytest.raises(ValueError, match="rho=1.0"):
        calibrate_adapters(module, list(islice(eva_data(), N)), forward=lambda m, b: m.training_step(b, 0),
                           resize=False)  # fmt: skip


# ----- two processes (gloo, CPU): DDP and FSDP2 -----
@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibration_runs")
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"calibration_runs.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-6000:]}")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    """One process on the same samples: each step's batch holds both ranks' batches."""
    torch.set_num_threads(1)
    corda = runs.run_single_process()
    return {"ddp": corda, "fsdp2": corda, "fsdp2_eva": runs.run_single_process(eva=True)}


def _load(out: Path, kind: str, run: str, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / f"{kind}-{run}-rank{rank}.pt")


@pytest.mark.parametrize("kind", [*runs.KINDS, "fsdp2_eva"])
def test_every_rank_calibrates_to_the_same_adapter_and_residual(launched, kind: str) -> None:
    for run in ("calibrated", "uninterrupted"):
        rank0, rank1 = (_load(launched, kind, run, rank) for rank in (0, 1))
        for part in ("adapter", "weights"):
            assert all(torch.equal(rank1[part][key], value) for key, value in rank0[part].items()), (run, part)


@pytest.mark.parametrize("kind", [*runs.KINDS, "fsdp2_eva"])
def test_two_processes_equal_one_process_on_the_same_samples(launched, kind: str, single_process) -> None:
    # The covariance is summed in another order (per rank, then across ranks): float32 rounding, which CorDA's
    # damped inverse amplifies (measured: up to 9e-5 of a tensor's largest value, KPM on fc2).
    for run in ("calibrated", "uninterrupted"):
        result, reference = _load(launched, kind, run, 0), single_process[kind][run]
        for part in ("adapter", "weights"):
            assert result[part].keys() == reference[part].keys()
            for key, value in reference[part].items():
                atol = 5e-4 * value.abs().max().item()
                torch.testing.assert_close(result[part][key], value, atol=atol, rtol=0, msg=(run, key))


@pytest.mark.parametrize("kind", runs.KINDS)
def test_distributed_resume_restores_without_calibrating(launched, kind: str) -> None:
    # The resumed runs had CorDA's statistics collection made to fail.
    uninterrupted, resumed = (_load(launched, kind, run, 0) for run in ("uninterrupted", "resumed"))
    for part in ("adapter", "weights"):
        assert all(torch.equal(resumed[part][key], value) for key, value in uninterrupted[part].items()), part

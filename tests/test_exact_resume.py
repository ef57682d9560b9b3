"""Exact resume: a run resumed from any checkpoint trains to the uninterrupted run's adapter, bit for bit (CPU).

Each case trains a tiny Llama for 4 epochs of 6 batches with a checkpoint per optimizer step, then resumes new runs
from a mid-epoch, an epoch-end and a later-epoch checkpoint. The DDP and SIGKILL tests run the small regression
model of ``resume_workers.py`` in other processes. ``LIGHTNING_LORA_TEST_WITHOUT_EXACT_RESUME=1`` runs the
same tests with ``LoraCallback(exact_resume=False)`` (Lightning alone): they fail, and their messages give the
difference that ExactResume removes.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import trainer_arguments
from models import tiny_llama
from resume_workers import DDP_POINTS, KILL_AT_STEP, make_loader
from resume_workers import fit as fit_worker_run
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_lora import ExactResume, LoraCallback, LoraConfig, adapter_state_dict, lora_param_groups
from lightning_lora.lightning.resume import write_atomically

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "resume_workers.py"
EXACT = os.environ.get("LIGHTNING_LORA_TEST_WITHOUT_EXACT_RESUME") != "1"
WITHOUT = [] if EXACT else ["--without"]
TOKENS = torch.randint(0, 96, (24, 8), generator=torch.Generator().manual_seed(5))  # 6 batches of 4


class CausalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama().train()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (tokens,) = batch
        self.log("val_loss", self.model(input_ids=tokens, labels=tokens).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=1e-2))


def sequential() -> DataLoader:
    return DataLoader(TensorDataset(TOKENS), batch_size=4)


def shuffled_by_generator() -> DataLoader:
    return DataLoader(TensorDataset(TOKENS), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))


def shuffled_by_global_seed() -> DataLoader:
    return DataLoader(TensorDataset(TOKENS), batch_size=4, shuffle=True)


def stateful_shuffled_by_generator() -> Any:
    """torchdata's StatefulDataLoader: Lightning saves and restores its position; ExactResume does not skip it."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    generator = torch.Generator().manual_seed(1)
    return StatefulDataLoader(TensorDataset(TOKENS), batch_size=4, shuffle=True, generator=generator)


@dataclass(frozen=True)
class Case:
    loader: Callable[[], Any]
    dropout: float = 0.0
    trainer: dict[str, Any] = field(default_factory=dict)
    validation: bool = False  # validate every epoch (and a sanity check first)

    @property
    def steps_per_epoch(self) -> int:
        return 6 // self.trainer.get("accumulate_grad_batches", 1)


CASES = {
    "sequential": Case(sequential),
    "shuffled_by_generator": Case(shuffled_by_generator),
    "shuffled_by_global_seed": Case(shuffled_by_global_seed),
    "max_steps": Case(sequential, trainer={"max_steps": 24, "max_epochs": -1}),
    "dropout_shuffled": Case(shuffled_by_global_seed, dropout=0.1),
    "accumulate_grad_batches_2": Case(shuffled_by_generator, trainer={"accumulate_grad_batches": 2}),
    "stateful_dataloader_dropout": Case(stateful_shuffled_by_generator, dropout=0.1),
}
TORCHDATA = importlib.util.find_spec("torchdata") is not None
NAMES = [
    pytest.param(name, marks=pytest.mark.skipif(not TORCHDATA, reason="needs torchdata"))
    if name.startswith("stateful") else name
    for name in CASES
]
POINTS = {  # a checkpoint's step, from the steps per epoch
    "mid_epoch": lambda per_epoch: per_epoch // 2,
    "epoch_end": lambda per_epoch: per_epoch,
    "later_epoch": lambda per_epoch: 2 * per_epoch + per_epoch // 2,
}


@dataclass
class Run:
    adapter: dict[str, torch.Tensor]
    global_step: int
    checkpoints: Optional[Path] = None


def fit(case: Case, checkpoints: Optional[Path] = None, ckpt_path: Optional[Path] = None, exact: bool = EXACT) -> Run:
    L.seed_everything(0, verbose=False)
    module = CausalLM()
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=case.dropout)
    callbacks: list[Any] = [LoraCallback(config, exact_resume=exact)]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    arguments = {"max_epochs": 4, "num_sanity_val_steps": 2 if case.validation else 0, **case.trainer}
    trainer = L.Trainer(**trainer_arguments(callbacks=callbacks, enable_checkpointing=checkpoints is not None,
                                            **arguments))
    validation = DataLoader(TensorDataset(TOKENS[:8]), batch_size=4) if case.validation else None
    trainer.fit(module, case.loader(), validation, ckpt_path=ckpt_path)
    return Run({k: v.detach().clone() for k, v in adapter_state_dict(module).items()}, trainer.global_step, checkpoints)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``uninterrupted(name)``: the case's run that never stopped, with a checkpoint per step (once per module)."""
    runs: dict[str, Run] = {}

    def run(name: str) -> Run:
        if name not in runs:
            runs[name] = fit(CASES[name], checkpoints=tmp_path_factory.mktemp(name))
        return runs[name]

    return run


def assert_same_adapter(resumed: Run, expected: Run, what: str) -> None:
    assert resumed.adapter.keys() == expected.adapter.keys()
    difference = max((resumed.adapter[k] - expected.adapter[k]).abs().max().item() for k in expected.adapter)
    steps = resumed.global_step, expected.global_step
    assert steps[0] == steps[1], f"{what}: {steps[0]} optimizer steps, the uninterrupted run took {steps[1]}"
    assert difference == 0.0, f"{what}: the adapter differs from the uninterrupted run's by up to {difference:.3g}"


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_any_step_checkpoint_is_bitwise_exact(
    uninterrupted: Callable[[str], Run], name: str, point: str
) -> None:
    expected = uninterrupted(name)
    step = POINTS[point](CASES[name].steps_per_epoch)
    assert expected.checkpoints is not None
    resumed = fit(CASES[name], ckpt_path=expected.checkpoints / f"step={step}.ckpt")
    assert_same_adapter(resumed, expected, f"{name}, resumed from step {step} ({point})")


def test_validation_after_a_checkpoint_is_not_needed_to_resume_exactly(tmp_path: Path) -> None:
    # The epoch-end step checkpoint is written before the epoch's validation, which the resumed run does not repeat;
    # validation's draws (its loader's seed) are undone, so the training stream does not depend on it.
    case = Case(shuffled_by_global_seed, dropout=0.1, validation=True)
    expected = fit(case, checkpoints=tmp_path)
    assert_same_adapter(fit(case, ckpt_path=tmp_path / "step=6.ckpt"), expected, "resumed before a validation")


class _Stream(IterableDataset):
    def __iter__(self) -> Any:
        return iter([(row,) for row in TOKENS])


def test_iterable_dataset_resumed_mid_epoch_warns_once_naming_the_fix(tmp_path: Path) -> None:
    case = Case(lambda: DataLoader(_Stream(), batch_size=4))
    fit(case, checkpoints=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(case, ckpt_path=tmp_path / "step=3.ckpt")
    ours = [w for w in caught if "cannot be positioned" in str(w.message)]
    assert len(ours) == 1
    assert "StatefulDataLoader" in str(ours[0].message) and "map-style Dataset" in str(ours[0].message)


class _PlainRegression(L.LightningModule):
    """No adapters: every weight trains, dropout draws from torch's generator."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_exact_resume_alone_resumes_a_model_without_adapters(tmp_path: Path) -> None:
    def fit_plain(ckpt_path: Optional[Path] = None) -> Run:
        L.seed_everything(0, verbose=False)
        module = _PlainRegression()
        callbacks: list[Any] = [ExactResume()] if EXACT else []
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1))
        trainer = L.Trainer(**trainer_arguments(max_epochs=3, callbacks=callbacks,
                                                enable_checkpointing=ckpt_path is None))
        trainer.fit(module, make_loader(), ckpt_path=ckpt_path)
        return Run({k: v.detach().clone() for k, v in module.state_dict().items()}, trainer.global_step)

    expected = fit_plain()
    assert_same_adapter(fit_plain(ckpt_path=tmp_path / "step=8.ckpt"), expected, "a plain model, resumed mid-epoch")


def test_exact_resume_changes_nothing_in_an_uninterrupted_run() -> None:
    case = CASES["dropout_shuffled"]
    assert_same_adapter(fit(case, exact=True), fit(case, exact=False), "with ExactResume vs without")


def test_lora_callback_adds_exact_resume_unless_told_not_to() -> None:
    for exact, expected in ((True, 1), (False, 0)):
        lora = LoraCallback(LoraConfig(r=2, target_modules=["q_proj"]), exact_resume=exact)
        trainer = L.Trainer(**trainer_arguments(max_steps=1, callbacks=[lora]))
        trainer.fit(CausalLM(), sequential())
        assert sum(isinstance(c, ExactResume) for c in trainer.callbacks) == expected


def test_a_write_interrupted_midway_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    write_atomically({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically({"step": 2, "tensor": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _environment() -> dict[str, str]:
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    return env


def test_sigkill_during_training_then_resume_from_last_ckpt_is_exact(tmp_path: Path) -> None:
    # The child blocks inside the write of last.ckpt after step KILL_AT_STEP (data written, not yet renamed) and is
    # SIGKILLed there; without ExactResume it blocks at the next batch instead.
    log = tmp_path / "log.txt"
    with log.open("wb") as output:
        child = subprocess.Popen([sys.executable, str(WORKERS), "train", str(tmp_path), *WITHOUT], cwd=ROOT,
                                 env=_environment(), stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (tmp_path / "ready").exists():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                child.wait()
                pytest.fail(f"the training process ended before step {KILL_AT_STEP}:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # loads: never a part-written file
    if EXACT:  # the write of step KILL_AT_STEP's last.ckpt was cut: its data lies in a temporary file
        assert saved["global_step"] == KILL_AT_STEP - 1
        assert len(list(last.parent.glob(".last.ckpt.*.tmp"))) == 1
    expected = fit_worker_run(EXACT)
    resumed = fit_worker_run(EXACT, ckpt_path=last)
    assert_same_adapter(Run(*resumed), Run(*expected), f"killed after step {KILL_AT_STEP}, resumed from last.ckpt")


@pytest.mark.slow
def test_ddp_two_processes_resume_from_any_step_checkpoint_is_exact(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(WORKERS), "ddp", str(tmp_path), *WITHOUT], cwd=ROOT,
                            env=_environment(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"the DDP run failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    runs = torch.load(tmp_path / "ddp.pt", weights_only=True)
    expected = Run(*runs["uninterrupted"])
    failures = []
    for point, step in DDP_POINTS.items():
        try:
            assert_same_adapter(Run(*runs[point]), expected, f"DDP, resumed from step {step} ({point})")
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)

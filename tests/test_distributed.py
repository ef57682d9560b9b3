"""Multi-process behaviour, for real: each strategy's runs are one launch of tests/distributed/resume_and_merge.py
with two processes (DDP and FSDP2 on CPU with gloo; FSDP1 and DeepSpeed on two GPUs, skipped without them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from lightning_models import BuiltInInit, lora_config, probe_inputs
from numerics import assert_parity

from lightning_lora import apply_lora, load_adapter_state_dict, load_merged_state_dict
from lightning_lora.core.common.distributed import clean_name, gather_full_state_dict
from lightning_lora.lightning.checkpoint import read_checkpoint_header

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "resume_and_merge.py"
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
DEEPSPEED = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not L.pytorch.strategies.deepspeed._DEEPSPEED_AVAILABLE,
    reason="needs two CUDA devices and deepspeed",
)
KINDS = {
    "ddp": ["ddp"],
    "fsdp2": ["fsdp2-sharded", "fsdp2-full"],
    "fsdp1": ["fsdp1-sharded", "fsdp1-full", "fsdp1-qlora"],
    "deepspeed": ["deepspeed2", "deepspeed3", "deepspeed3-qlora"],
}
MARKS = {"ddp": [], "fsdp2": [], "fsdp1": [TWO_GPUS], "deepspeed": [DEEPSPEED]}
RESUME_CASES = [pytest.param(kind, name, marks=MARKS[kind], id=name) for kind, names in KINDS.items() for name in names]
KIND_CASES = [pytest.param(kind, marks=MARKS[kind], id=kind) for kind in KINDS]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``launched(kind)``: the output directory of the two-process run of ``kind`` (run once per module)."""
    outputs: dict[str, Path] = {}

    def launch(kind: str) -> Path:
        if kind not in outputs:
            out = tmp_path_factory.mktemp(kind)
            python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
            env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
            for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(variable, None)
            result = subprocess.run(
                [sys.executable, str(SCRIPT), kind, str(out)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
            )
            (out / "log.txt").write_text(result.stdout + result.stderr)
            if result.returncode != 0:
                output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
                pytest.fail(f"{kind} run failed ({result.returncode}):\n{output}")
            outputs[kind] = out
        return outputs[kind]

    return launch


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("kind", "name"), RESUME_CASES)
def test_resume_from_adapter_only_checkpoint_is_exact(launched: Callable[[str], Path], kind: str, name: str) -> None:
    out = launched(kind)
    uninterrupted = torch.load(out / f"{name}-uninterrupted.pt")["adapter"]
    resumed = torch.load(out / f"{name}-resumed.pt")["adapter"]
    assert _equal(resumed, uninterrupted)
    assert "model.fc1.lora_A.default" in resumed


@pytest.mark.parametrize(("kind", "name"), RESUME_CASES)
def test_checkpoint_holds_only_the_adapter(launched: Callable[[str], Path], kind: str, name: str) -> None:
    out = launched(kind)
    header = read_checkpoint_header(out / f"{name}-checkpoints" / "epochepoch=0.ckpt", weights_only=False)
    if header is None:
        pytest.skip(f"{name} writes its own checkpoint layout")
    adapter = torch.load(out / f"{name}-resumed.pt")["adapter"]
    shapes, _ = header
    assert {key: tuple(shape) for key, shape in shapes.items()} == {k: tuple(v.shape) for k, v in adapter.items()}


def test_fsdp2_adapters_added_before_fully_shard_are_sharded(launched: Callable[[str], Path]) -> None:
    out = launched("fsdp2")
    assert torch.load(out / "fsdp2-sharded-resumed.pt")["sharded"]  # built in __init__, injected at setup
    # Built on the meta device in configure_model, inject_adapters(self) before fully_shard:
    assert torch.load(out / "fsdp2-full-resumed.pt")["sharded"]
    assert "uninitialized memory" not in (out / "log.txt").read_text()  # materialised by the layers' reset


@pytest.mark.parametrize("name", ["fsdp2-sharded", "fsdp2-full"])
def test_fsdp2_checkpoint_of_another_rank_is_refused_before_loading(launched: Callable[[str], Path], name: str) -> None:
    message = (launched("fsdp2") / f"{name}-refused.txt").read_text()
    assert "another LoraConfig (r: checkpoint 4 vs now 2)" in message  # the changed field first, before shapes
    assert "Nothing was loaded" in message


@pytest.mark.parametrize("kind", KIND_CASES)
def test_merge_on_fit_end_writes_weights_that_compute_what_the_adapter_did(
    launched: Callable[[str], Path], kind: str
) -> None:
    out = launched(kind)
    result = torch.load(out / "merge.pt")
    assert result["merged"]
    L.seed_everything(0)  # the base model the run started from
    unmerged = BuiltInInit()
    apply_lora(unmerged.model, lora_config())
    load_adapter_state_dict(unmerged, result["adapter"])
    L.seed_everything(0)
    merged = BuiltInInit().model
    merged.load_state_dict(load_merged_state_dict(out / "merged"))  # strict: the plain model's keys, no adapter
    x = probe_inputs()
    with torch.no_grad():
        expected, actual = unmerged.model(x), merged(x)
    assert_parity(actual, expected)
    assert not torch.allclose(merged.fc1.weight, unmerged.model.fc1.weight)  # the merge changed the base


def test_clean_name_drops_wrapper_parts() -> None:
    name = "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module._orig_mod.q_proj.lora_A.default"
    assert clean_name(name) == "model.layers.0.q_proj.lora_A.default"


def test_gather_full_state_dict_on_one_process_returns_cpu_copies() -> None:
    state = {"b": torch.ones(2), "a": torch.zeros(3)}
    gathered = gather_full_state_dict(state)
    assert list(gathered) == ["b", "a"] and _equal(gathered, state)
    assert all(gathered[k].data_ptr() != state[k].data_ptr() for k in state)

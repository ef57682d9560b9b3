"""Adapters in a Lightning Fabric loop (tests/distributed/fabric_runs.py), one process and two FSDP2 ranks
(``ModelParallelStrategy``, gloo, CPU): injection before setup, an SVD init identical on every rank, training equal
to one process, an adapter-only ``fabric.save`` that resumes exactly, and a PEFT export that loads back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_models import TinyNet, lora_config, probe_inputs
from numerics import assert_parity

from lightning_lora import apply_lora, load_adapter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "fabric_runs.py"
KINDS = ["single", pytest.param("fsdp2", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory):
    """``launched(kind)``: the output directory of that run (each runs once)."""
    outputs: dict[str, Path] = {}

    def launch(kind: str) -> Path:
        if kind not in outputs:
            out = tmp_path_factory.mktemp(f"fabric_{kind}")
            python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(SCRIPT.parent)])
            env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
            for variable in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(variable, None)
            result = subprocess.run([sys.executable, str(SCRIPT), kind, str(out)], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                pytest.fail(f"fabric_runs.py {kind} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
            outputs[kind] = out
        return outputs[kind]

    return launch


def _load(out: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / f"{name}.pt")


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_only_fabric_checkpoint_resumes_exactly(launched, kind: str) -> None:
    out = launched(kind)
    for rank in range(2 if kind == "fsdp2" else 1):
        uninterrupted, resumed = (_load(out, f"{kind}-{run}-rank{rank}") for run in ("uninterrupted", "resumed"))
        for part in ("adapter", "weights"):
            assert all(torch.equal(resumed[part][key], value) for key, value in uninterrupted[part].items()), part
    model_state = torch.load(out / f"{kind}-adapter.ckpt", weights_only=False)["model"]
    assert model_state and all(".lora_" in key or key.startswith("head.") for key in model_state)
    assert (out / f"{kind}-adapter.ckpt").stat().st_size < (out / f"{kind}-full.ckpt").stat().st_size


@pytest.mark.slow
def test_two_fsdp2_ranks_hold_the_same_init_and_train_like_one_process(launched) -> None:
    single = _load(launched("single"), "single-uninterrupted-rank0")
    rank0, rank1 = (_load(launched("fsdp2"), f"fsdp2-uninterrupted-rank{rank}") for rank in (0, 1))
    for part in ("adapter", "weights"):  # the trained adapter, and the SVD init's residual base weights
        assert all(torch.equal(rank1[part][key], value) for key, value in rank0[part].items()), part
        for key, value in single[part].items():
            assert_parity(rank0[part][key], value, msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_the_peft_export_from_a_fabric_run_loads_back(launched, kind: str) -> None:
    trained = _load(launched(kind), f"{kind}-uninterrupted-rank0")
    torch.manual_seed(0)
    reference = apply_lora(TinyNet(), lora_config(init="pissa_niter_2"))
    reference.load_state_dict({**trained["adapter"], **trained["weights"]}, strict=False)
    torch.manual_seed(0)
    loaded = load_adapter(TinyNet(), launched(kind) / f"{kind}-peft")
    with torch.no_grad():
        assert_parity(loaded(probe_inputs()), reference(probe_inputs()))

"""PEFT's own LoRA test configurations through lightning_lora: import, export and merge, case by case.

PEFT runs its generic tests over one table, ``TEST_CASES`` in ``tests/test_custom_models.py``: rows of
``(name, model id, config class, config kwargs)`` on small hand-written models. ``CASES`` below is that table's
``LoraConfig`` rows (all 46 of them, the data copied as it is: name, model id, kwargs), read at huggingface/peft
commit 5d602fdb (its ``__version__`` says 0.20.1.dev0; the newest snapshot that could be had, while the installed
oracle is PEFT 0.21.2). The models are our own copies of PEFT's, built with ``torch.manual_seed(0)``.

For each case:

1. PEFT: ``get_peft_model(model, LoraConfig(**kwargs))``, every trainable tensor moved off its init (``B`` non-zero,
   DoRA magnitudes and ``modules_to_save`` copies changed too), the reference output on PEFT's test input
   (``torch.arange(90).view(9, 10)``), ``save_pretrained``.
2. Import: ``load_adapter(fresh model, dir)``; output compared with PEFT's.
3. Export: ``save_adapter(ours, dir2)``, ``peft.PeftModel.from_pretrained(fresh model, dir2)``; output compared.
4. Merge: ``merge_lora(ours)``; output compared with the unmerged one. A merge refused by name where PEFT's own
   ``merge_adapter`` refuses too (grouped convolutions) is the expected outcome.

Outputs are compared in fp32, eval mode: ``|ours - reference| <= atol + rtol * |reference|`` with
``atol = rtol = 1e-5``. The ``rtol`` is needed by the merges: PEFT's integer test input gives outputs of 20 to 50, where
a merged weight's rounding moves them by a few fp32 steps (up to 1.5e-5). Each record also keeps how far the adapter
moves the output from the base model's, which must be far above the tolerance for a comparison to mean anything.
A case's status is the first thing that went wrong:

- ``round-trips``: all three comparisons hold (or the merge is refused where PEFT refuses too);
- ``refused``: a ``ValueError``/``TypeError`` from lightning_lora (its message's first line is kept) at a stage;
- ``differs from PEFT, PEFT wrong``: our import differs from PEFT's output but equals the update computed by hand
  (each base weight plus ``scaling * B @ A`` from PEFT's own file, in a plain copy of the model), and PEFT's does not;
  the export and merge are then still checked (export against PEFT's output: the same tensors must give PEFT's
  numbers back);
- ``wrong numbers``: a comparison failed (the largest difference is kept): a bug;
- ``crash``: any other exception from lightning_lora, or PEFT failing on a file we wrote: a bug;
- ``PEFT fails``: PEFT itself could not build, run or save the case (not ours to judge).

Usage: ``python benchmarks/peft_lora_configs.py [--only SUBSTRING] [--out PATH]``; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import peft
import torch
from peft.tuners.lora.config import BdLoraConfig
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
import harness  # noqa: E402

from lightning_lora import load_adapter, merge_lora, save_adapter  # noqa: E402

PEFT_SOURCE = "huggingface/peft tests/test_custom_models.py TEST_CASES, commit 5d602fdb (0.20.1.dev0)"
ATOL = 1e-5
RTOL = 1e-5
REFUSALS = (ValueError, TypeError, FileNotFoundError)  # how lightning_lora refuses by name (STYLE.md)

# ----- the cases: PEFT's LoraConfig rows of TEST_CASES, in its order -----
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "kasa_config": peft.KasaConfig(), "r": 4}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    (
        "Vanilla MLP 10 LoRA with VeLoRA random",
        "MLP",
        {"target_modules": ["lin0"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="random")},
    ),
    (
        "Vanilla MLP 11 LoRA with VeLoRA batch_average",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average"),
        },
    ),
    (
        "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
        "MLP",
        {"target_modules": ["lin0"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average_once")},
    ),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    (
        "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    (
        "Vanilla MLP 1 LoRA with Monteclora",
        "MLP",
        {"target_modules": ["lin0"], "monteclora_config": peft.MontecloraConfig(num_samples=2)},
    ),
    (
        "BD-LoRA A only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False),
        },
    ),
    (
        "BD-LoRA B only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
        },
    ),
    (
        "BD-LoRA both A and B",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
        },
    ),
]


# ----- the models: our copies of PEFT's small test models (same layers, names and forward) -----
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class EmbConv1D(nn.Module):
    """An embedding and a Hugging Face ``Conv1D`` (a transposed linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


class Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(x.float().reshape(-1, 1, 10))))))


class Conv2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))))))


class Conv2dGroups(nn.Module):
    """A grouped convolution (groups=8, so PEFT's default r=8 is divisible by it) between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class Conv2dGroups2(nn.Module):
    """A grouped convolution (groups=2) with more output than input channels; as PEFT's, it ignores its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(9 * 16 * 20 * 20, device=self.conv2d.weight.device).view(9, 16, 20, 20).float()
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(h)))))


class Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() == 2:  # a 2-D input becomes a 3-D volume
            x = torch.stack([x] * 3, dim=-1)
        return self.sm(self.lin0(self.flat(self.relu(self.conv3d(x.reshape(-1, 5, 3, 3, 3))))))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        h, _ = self.mha(x, x, x)
        return self.sm(self.lin0(h))


class LinearUsingParameter(nn.Module):
    """A linear layer that is not an ``nn.Linear``: only ``target_parameters`` can reach its weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = LinearUsingParameter(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": Conv1d,
    "Conv2d": Conv2d,
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "Conv3d": Conv3d,
    "MHA": MHA,
    "MlpUsingParameters": MlpUsingParameters,
}


def build(model_id: str) -> nn.Module:
    """The same base weights every call (PEFT's tests seed 0 before each model too), in eval mode."""
    torch.manual_seed(0)
    return MODELS[model_id]().float().eval()


def test_input() -> torch.Tensor:
    return torch.arange(90).view(9, 10)  # PEFT's prepare_inputs_for_testing


# ----- one case -----
class CaseFailed(Exception):
    """Ends a case with its status and detail."""

    def __init__(self, status: str, stage: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.stage, self.detail = status, stage, detail


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def ours(stage: str, function: Callable[[], Any]) -> Any:
    """Run a lightning_lora step: a refusal by name or a crash ends the case."""
    try:
        return function()
    except REFUSALS as err:
        raise CaseFailed("refused", stage, first_line(err)) from None
    except Exception as err:  # noqa: BLE001 - every other exception is a crash to report
        where = traceback.extract_tb(err.__traceback__)[-1]
        raise CaseFailed("crash", stage, f"{first_line(err)} (at {Path(where.filename).name}:{where.lineno})") from None


def theirs(stage: str, function: Callable[[], Any], status: str = "PEFT fails") -> Any:
    try:
        return function()
    except Exception as err:  # noqa: BLE001
        raise CaseFailed(status, stage, first_line(err)) from None


@torch.no_grad()
def output(model: nn.Module) -> torch.Tensor:
    return model(test_input()).detach().clone()


def compare(stage: str, got: torch.Tensor, want: torch.Tensor, diffs: dict[str, float]) -> None:
    """Record the largest difference; a mismatch ends the case as wrong numbers."""
    if got.shape != want.shape:
        raise CaseFailed("wrong numbers", stage, f"output shape {tuple(got.shape)} vs {tuple(want.shape)}")
    difference = (got - want).abs()
    diffs[stage] = float(difference.max())
    if not torch.isfinite(got).all() or bool((difference > ATOL + RTOL * want.abs()).any()):
        raise CaseFailed("wrong numbers", stage, f"max |difference| {diffs[stage]:.3g} (output scale "
                         f"{float(want.abs().max()):.3g})")


@torch.no_grad()
def move_off_init(model: nn.Module) -> None:
    """Add seeded noise to every trainable tensor so no adapter tensor keeps its init (PEFT's B is zero)."""
    generator = torch.Generator().manual_seed(1)
    for _, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def peft_merge_refused(peft_model: nn.Module) -> str | None:
    """PEFT's own answer to merging this adapter: None when it merges, else its error's first line."""
    try:
        copy.deepcopy(peft_model).merge_adapter()
    except Exception as err:  # noqa: BLE001
        return first_line(err)
    return None


@torch.no_grad()
def by_hand(model_id: str, peft_dir: Path) -> torch.Tensor | None:
    """The output of a plain copy of the model whose weights get ``scaling * B @ A`` from PEFT's file added by hand:
    an independent reference for plain LoRA on ``nn.Linear`` and ``nn.MultiheadAttention`` (where PEFT keeps
    ``<mha>.lora_A`` for the packed ``in_proj_weight`` and ``<mha>.base_layer.out_proj.lora_A`` for ``out_proj``).
    None for anything else."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("lora_bias") or config.get("rank_pattern") or config.get("use_rslora"):
        return None
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    model = build(model_id)
    for key, lora_a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight").split(".")
        module = model.get_submodule(".".join(part for part in path if part != "base_layer"))
        delta = scaling * tensors[key.replace(".lora_A.", ".lora_B.")] @ lora_a
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight += delta
        elif type(module) is nn.Linear or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            module.weight += delta
        else:
            return None
    return output(model)


def run_case(name: str, model_id: str, kwargs: dict[str, Any], work: Path) -> dict[str, Any]:
    diffs: dict[str, float] = {}
    record: dict[str, Any] = {"name": name, "model": model_id, "config": {k: repr(v) for k, v in kwargs.items()}}
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            record.update(stages(kwargs, model_id, work, diffs))
        except CaseFailed as failed:
            record.update(status=failed.status, stage=failed.stage, detail=failed.detail)
    if "detail" in record:
        record["detail"] = record["detail"].replace(f"{work}/", "<dir>/")
    record["max_abs_diff"] = diffs
    record["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    record["wall_s"] = round(time.perf_counter() - wall, 3)
    record["cpu_s"] = round(time.process_time() - cpu, 3)
    return record


def stages(kwargs: dict[str, Any], model_id: str, work: Path, diffs: dict[str, float]) -> dict[str, Any]:
    peft_dir, our_dir = work / "peft", work / "ours"

    def make_peft() -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(1)
        model = peft.get_peft_model(build(model_id), peft.LoraConfig(**copy.deepcopy(kwargs))).eval()
        move_off_init(model)
        reference = output(model)
        model.save_pretrained(peft_dir)
        return model, reference

    peft_model, reference = theirs("PEFT build/save", make_peft)
    # How far the adapter moves the output: a comparison is only meaningful when this is well above the tolerance.
    diffs["adapter effect (PEFT vs base)"] = float((reference - output(build(model_id))).abs().max())
    diffs["output scale (max |PEFT output|)"] = float(reference.abs().max())

    model = ours("import", lambda: load_adapter(build(model_id), peft_dir).eval())
    unmerged = ours("import forward", lambda: output(model))
    peft_wrong = ""
    try:
        compare("import", unmerged, reference, diffs)
    except CaseFailed as failed:
        hand = by_hand(model_id, peft_dir)
        if hand is None:
            raise
        hand_diffs: dict[str, float] = {}
        compare("import vs by hand", unmerged, hand, hand_diffs)  # raises: ours is wrong too
        diffs.update(hand_diffs, peft_vs_by_hand=float((reference - hand).abs().max()))
        peft_wrong = (f"ours = W + s*B@A by hand (max diff {hand_diffs['import vs by hand']:.2g}); PEFT differs "
                      f"from it ({failed.detail})")

    ours("export", lambda: save_adapter(model, our_dir))
    reloaded = theirs(
        "PEFT loads our export", lambda: peft.PeftModel.from_pretrained(build(model_id), our_dir), "crash"
    )
    compare("export", theirs("PEFT forward on our export", lambda: output(reloaded.eval()), "crash"), reference, diffs)

    peft_refusal = peft_merge_refused(peft_model)
    try:
        merge_lora(model)
    except REFUSALS as err:
        if peft_refusal is None:
            raise CaseFailed("refused", "merge", first_line(err)) from None
        return {"status": "differs from PEFT, PEFT wrong" if peft_wrong else "round-trips", "stage": None,
                "merge": "refused by name; PEFT refuses too",
                "detail": f"{peft_wrong}; merge: ours: {first_line(err)} | PEFT: {peft_refusal}".lstrip("; ")}
    except Exception as err:  # noqa: BLE001
        raise CaseFailed("crash", "merge", first_line(err)) from None
    compare("merge", ours("merged forward", lambda: output(model)), unmerged, diffs)
    note = f"PEFT refuses to merge ({peft_refusal}) but ours merged exactly" if peft_refusal else ""
    detail = "; ".join(part for part in (peft_wrong, note) if part)
    status = "differs from PEFT, PEFT wrong" if peft_wrong else "round-trips"
    return {"status": status, "stage": None, "merge": "merged", "detail": detail}


# ----- the sweep -----
def summary_table(results: list[dict[str, Any]]) -> str:
    lines = ["| # | case | model | status | stage | detail | s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for index, r in enumerate(results, 1):
        detail = r["detail"] if r["status"] != "round-trips" else r.get("merge", "")
        lines.append(f"| {index} | {r['name']} | {r['model']} | {r['status']} | {r['stage'] or ''} | "
                     f"{detail[:140]} | {r['wall_s']:.2f} |")
    return "\n".join(lines)


def checkout() -> str:
    """The commit measured, with a note when the working tree had uncommitted changes."""
    def git(*args: str) -> str:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "lightning_lora")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in lightning_lora/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peft_lora_configs.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [case for case in CASES if args.only is None or args.only in case[0]]
    results = []
    for name, model_id, kwargs in cases:
        with tempfile.TemporaryDirectory() as work:
            results.append(run_case(name, model_id, kwargs, Path(work)))
        r = results[-1]
        print(f"{r['status']:>14}  {name}  {r['stage'] or ''} {r['detail'][:160]}", file=sys.stderr, flush=True)
    counts = Counter(r["status"] for r in results)
    refusals = Counter(f"{r['stage']}: {r['detail']}" for r in results if r["status"] == "refused")
    print(summary_table(results))
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    print(f"\n{counts['round-trips']} of {len(results)} round-trip; {tally}")
    for reason, n in refusals.most_common():
        print(f"  refused x{n}: {reason}")
    if args.only is None:
        harness.write_json(args.out, {
            "what": "PEFT's LoRA test configurations through lightning_lora's import, export and merge",
            "cases_from": PEFT_SOURCE,
            "peft": peft.__version__,
            "lightning_lora_checkout": checkout(),
            "machine": harness.machine(),
            "atol": ATOL,
            "rtol": RTOL,
            "counts": dict(counts),
            "refusals": dict(refusals),
            "results": results,
        })
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

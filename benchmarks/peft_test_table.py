"""PEFT's own test table through lightning_lora: import, export and merge, case by case, for every kind we have.

PEFT runs its generic tests over one table, ``TEST_CASES`` in ``tests/test_custom_models.py``: rows of
``(name, model id, config class, config kwargs)`` on small hand-written models. ``benchmarks/peft_table_cases.py``
holds that table's rows of the kinds lightning_lora has (LoRA with DoRA and its variants, LoHa, LoKr, OFT, BOFT, VeRA,
VB-LoRA, AdaLoRA: 134 rows, the data copied as it is) and our copies of the models, built with
``torch.manual_seed(0)``.

For each case:

1. PEFT: ``get_peft_model(model, Config(**kwargs))``, every trainable tensor moved off its init (``B`` non-zero,
   DoRA magnitudes, rotations, logits and ``modules_to_save`` copies changed too), the reference output on PEFT's test
   input (``torch.arange(90).view(9, 10)``), ``save_pretrained``.
2. Import: ``load_adapter(fresh model, dir)``; output compared with PEFT's.
3. Export: ``save_adapter(ours, dir2)``, ``peft.PeftModel.from_pretrained(fresh model, dir2)``; output compared.
4. Merge: ``merge_lora(ours)``; output compared with the unmerged one. A merge refused by name where PEFT's own
   ``merge_adapter`` refuses too (e.g. LoRA on grouped convolutions) is the expected outcome.

Outputs are compared in fp32, eval mode: ``|ours - reference| <= atol + rtol * |reference|`` with
``atol = rtol = 1e-5``. The ``rtol`` is needed by the merges: PEFT's integer test input gives outputs of 20 to 50, where
a merged weight's rounding moves them by a few fp32 steps (up to 1.5e-5). Each record also keeps how far the adapter
moves the output from the base model's, which must be far above the tolerance for a comparison to mean anything.
A case's status is the first thing that went wrong:

- ``round-trips``: all three comparisons hold (or the merge is refused where PEFT refuses too);
- ``refused``: a ``ValueError``/``TypeError`` from lightning_lora (its message's first line is kept) at a stage;
- ``differs from PEFT, PEFT wrong``: our import differs from PEFT's output but equals the update computed by hand
  (plain LoRA: each base weight plus ``scaling * B @ A`` from PEFT's own file, in a plain copy of the model), and
  PEFT's does not; the export and merge are then still checked (export against PEFT's output: the same tensors must
  give PEFT's numbers back);
- ``wrong numbers``: a comparison failed (the largest difference is kept): a bug;
- ``crash``: any other exception from lightning_lora, or PEFT failing on a file we wrote: a bug;
- ``PEFT fails``: PEFT itself could not build, run or save the case (not ours to judge).

Usage: ``python benchmarks/peft_test_table.py [--only SUBSTRING] [--out PATH]``; about two minutes on 2 CPU cores.
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
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import peft
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
import harness  # noqa: E402
from peft_table_cases import CASES, MODELS, PEFT_SOURCE  # noqa: E402

from lightning_lora import load_adapter, merge_lora, save_adapter  # noqa: E402

ATOL = 1e-5
RTOL = 1e-5
REFUSALS = (ValueError, TypeError, FileNotFoundError)  # how lightning_lora refuses by name (STYLE.md)


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
    options = ("use_dora", "lora_bias", "rank_pattern", "use_rslora")
    if config.get("peft_type") != "LORA" or any(config.get(option) for option in options):
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


def run_case(name: str, model_id: str, config_class: type, kwargs: dict[str, Any], work: Path) -> dict[str, Any]:
    diffs: dict[str, float] = {}
    record: dict[str, Any] = {"name": name, "model": model_id, "kind": kind_of_row(config_class, kwargs),
                              "config": {k: repr(v) for k, v in kwargs.items()}}
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            record.update(stages(config_class, kwargs, model_id, work, diffs))
        except CaseFailed as failed:
            record.update(status=failed.status, stage=failed.stage, detail=failed.detail)
    if "detail" in record:
        record["detail"] = record["detail"].replace(f"{work}/", "<dir>/")
    record["max_abs_diff"] = diffs
    record["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    record["wall_s"] = round(time.perf_counter() - wall, 3)
    record["cpu_s"] = round(time.process_time() - cpu, 3)
    return record


def stages(
    config_class: type, kwargs: dict[str, Any], model_id: str, work: Path, diffs: dict[str, float]
) -> dict[str, Any]:
    peft_dir, our_dir = work / "peft", work / "ours"

    def make_peft() -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(1)
        model = peft.get_peft_model(build(model_id), config_class(**copy.deepcopy(kwargs))).eval()
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
def kind_of_row(config_class: type, kwargs: dict[str, Any]) -> str:
    """The kind a row tests, as the tallies name it (DoRA rows of ``LoraConfig`` apart)."""
    return "DoRA" if kwargs.get("use_dora") else config_class.__name__.removesuffix("Config")


STATUSES = ("round-trips", "differs from PEFT, PEFT wrong", "refused", "wrong numbers", "crash", "PEFT fails")


def kind_table(results: list[dict[str, Any]]) -> str:
    """Rows per kind and status."""
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_kind[r["kind"]][r["status"]] += 1
    lines = ["| kind | rows | " + " | ".join(STATUSES) + " |", "| --- " * (len(STATUSES) + 2) + "|"]
    for kind, counts in by_kind.items():
        lines.append(f"| {kind} | {sum(counts.values())} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--kind", default=None, help="run only the rows of this kind (LoHa, DoRA, BOFT, ...)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peft-boft-extension", action="store_true",
                        help="give PEFT's BOFT its CUDA extension's block-diagonal in torch (tests/peft_boft.py), so "
                             "PEFT computes every butterfly factor on CPU instead of silently falling back to one")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default, for a run of every row: results/peft_test_table.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peft_boft_extension:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from peft_boft import use_torch_block_diag_in_peft

        use_torch_block_diag_in_peft()
    if args.out is None and args.only is None and args.kind is None and not args.peft_boft_extension:
        args.out = Path(__file__).parent / "results" / "peft_test_table.json"
    cases = [
        case for case in CASES
        if (args.only is None or args.only in case[0]) and args.kind in (None, kind_of_row(case[2], case[3]))
    ]
    results = []
    for name, model_id, config_class, kwargs in cases:
        with tempfile.TemporaryDirectory() as work:
            results.append(run_case(name, model_id, config_class, kwargs, Path(work)))
        r = results[-1]
        print(f"{r['status']:>14}  {name}  {r['stage'] or ''} {r['detail'][:160]}", file=sys.stderr, flush=True)
    counts = Counter(r["status"] for r in results)
    refusals = Counter(f"{r['stage']}: {r['detail']}" for r in results if r["status"] == "refused")
    print(summary_table(results))
    print("\n" + kind_table(results))
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    print(f"\n{counts['round-trips']} of {len(results)} round-trip; {tally}")
    for reason, n in refusals.most_common():
        print(f"  refused x{n}: {reason}")
    if args.out is not None:
        harness.write_json(args.out, {
            "what": "PEFT's test table (its rows of our kinds) through lightning_lora's import, export and merge",
            "cases_from": PEFT_SOURCE,
            "peft": peft.__version__,
            "peft_boft_extension": "torch block-diagonal" if args.peft_boft_extension else "none (PEFT's CPU fallback)",
            "rows": {"only": args.only, "kind": args.kind},
            "lightning_lora_checkout": checkout(),
            "machine": harness.machine(),
            "atol": ATOL,
            "rtol": RTOL,
            "counts": dict(counts),
            "counts_by_kind": {kind: dict(Counter(r["status"] for r in results if r["kind"] == kind))
                               for kind in dict.fromkeys(r["kind"] for r in results)},
            "refusals": dict(refusals),
            "results": results,
        })
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

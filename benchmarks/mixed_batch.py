"""Inference cost of a mixed-adapter batch: 8 samples over 4 LoRA adapters in one forward, against one adapter.

The model is the benchmark model of ``train_step.py``: a transformers Llama built from a config (768 hidden, 2048
intermediate, 6 layers, 12 heads, 32000 vocab, fp32, about 92M parameters). Four LoRA adapters r=8 / alpha=16 on all
linear layers; a batch of 8 x 64 tokens, forward only (``torch.no_grad``, no KV cache). Runs:

- ``base``: the same model without adapters (the floor).
- ``ours-single`` / ``peft-single``: all four adapters loaded, one active for the whole batch.
- ``ours-mixed`` / ``peft-mixed``: each adapter for two samples, interleaved (``a0 a1 a2 a3 a0 a1 a2 a3``), through
  :func:`~lightning_lora.core.composition.mixed_batch.mixed_adapter_batch` and PEFT's ``adapter_names=`` forward.
- ``ours-mixed-sorted``: the same with each adapter's samples next to each other (``a0 a0 a1 a1 ...``).

The adapters' B factors are random (not PEFT's zero init), so every update is real work. Each measurement runs in
its own process with fixed threads; rounds are interleaved. Reported: the best and the median CPU seconds per
forward (process time) and their ratios; the target is ``ours-mixed`` <= 1.3x ``ours-single``.

Usage::

    python benchmarks/mixed_batch.py                # full run (about 5 minutes on 2 cores)
    python benchmarks/mixed_batch.py --rounds 1 --steps 1 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
import harness
from train_step import benchmark_llama

ADAPTERS = ["a0", "a1", "a2", "a3"]
INTERLEAVED = ADAPTERS * 2
SORTED = [name for name in ADAPTERS for _ in range(2)]
NAMES = ["base", "ours-single", "ours-mixed", "ours-mixed-sorted", "peft-single", "peft-mixed"]
RESULTS = Path(__file__).resolve().parent / "results" / "mixed_batch.json"


def base_model() -> torch.nn.Module:
    return benchmark_llama().eval()  # train_step.py's model


def build(name: str) -> tuple[torch.nn.Module, dict, object]:
    """The model of a run, the keyword arguments of its forward and the context it runs in."""
    from contextlib import nullcontext

    model = base_model()
    if name == "base":
        return model, {}, nullcontext()
    if name.startswith("peft"):
        import peft

        def config() -> peft.LoraConfig:
            return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")

        model = peft.get_peft_model(model, config(), adapter_name=ADAPTERS[0])
        for adapter in ADAPTERS[1:]:
            model.add_adapter(adapter, config())
        _randomize(model)
        model.eval()
        if name == "peft-single":
            model.set_adapter(ADAPTERS[0])
            return model, {}, nullcontext()
        return model, {"adapter_names": INTERLEAVED}, nullcontext()

    from lightning_lora.core.composition.mixed_batch import mixed_adapter_batch
    from lightning_lora.core.config.lora_config import LoraConfig
    from lightning_lora.core.layers.adapter_set import set_active_adapters
    from lightning_lora.core.surgery.inject import apply_lora

    for adapter in ADAPTERS:
        apply_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"), adapter)
    _randomize(model)
    model.eval()
    if name == "ours-single":
        set_active_adapters(model, ADAPTERS[0])
        return model, {}, nullcontext()
    names = INTERLEAVED if name == "ours-mixed" else SORTED
    return model, {}, mixed_adapter_batch(model, names)


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for key, parameter in model.named_parameters():
        if "lora_" in key:
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def worker(name: str, threads: int, warmup: int, steps: int, length: int) -> dict:
    torch.set_num_threads(threads)
    # Every worker imports the same libraries.
    import peft  # noqa: F401

    import lightning_lora  # noqa: F401

    model, kwargs, context = build(name)
    tokens = torch.randint(0, 32000, (8, length), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=tokens, use_cache=False, **kwargs)

    with torch.no_grad(), context:
        times = harness.time_steps(step, warmup, steps)
    return {"forward_cpu_s": sorted(times)[len(times) // 2], "forward_cpu_min_s": min(times)}


def report(results: dict[str, list[dict]]) -> dict:
    """Per run: the best forward over all rounds and the median of the rounds' medians; ratios against the base,
    against the same library's single-adapter batch, and (ours) against PEFT's mixed forward."""
    rows = {
        name: {
            "forward_cpu_best_s": min(r["forward_cpu_min_s"] for r in rounds),
            "forward_cpu_median_s": harness.median_of(rounds, "forward_cpu_s"),
        }
        for name, rounds in results.items()
    }
    for name, row in rows.items():
        side = name.split("-")[0]
        for key in ("forward_cpu_best_s", "forward_cpu_median_s"):
            row[f"{key}_vs_base"] = row[key] / rows["base"][key]
            if "mixed" in name and f"{side}-single" in rows:
                row[f"{key}_vs_single"] = row[key] / rows[f"{side}-single"][key]
            if side == "ours" and "mixed" in name and "peft-mixed" in rows:
                row[f"{key}_vs_peft_mixed"] = row[key] / rows["peft-mixed"][key]
    nan = float("nan")
    print(f"{'run':<18} {'best s':>7} {'vs base':>8} {'vs single':>10} {'vs PEFT mixed':>14} "
          f"{'median s':>9} {'vs base':>8} {'vs single':>10} {'vs PEFT mixed':>14}")
    for name, row in rows.items():
        cells = []
        for key in ("forward_cpu_best_s", "forward_cpu_median_s"):
            cells.append(
                f"{row[key]:>{7 if key.endswith('best_s') else 9}.3f} {row[f'{key}_vs_base']:>7.3f}x "
                f"{row.get(f'{key}_vs_single', nan):>9.3f}x {row.get(f'{key}_vs_peft_mixed', nan):>13.3f}x"
            )
        print(f"{name:<18} " + " ".join(cells))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=NAMES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--only", nargs="*", default=NAMES, help="subset of runs (base is always included)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.warmup, args.steps, args.length)))
        return
    names = ["base"] + [n for n in args.only if n != "base"]
    extra = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--length", str(args.length)]
    load_before = os.getloadavg()
    results = harness.interleaved(__file__, names, args.rounds, args.threads, extra)
    rows = report(results)
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average (1, 5, 15 min) before {load_before}, after {load['after']}")
    harness.write_json(
        args.out,
        {"machine": {**harness.machine(), "load_average": load}, "settings": {**vars(args), "out": str(args.out)},
         "medians": rows, "raw": results},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

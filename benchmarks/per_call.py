"""What one adapted layer adds to a forward + backward call: lightning_lora vs HF PEFT vs the frozen base, 1 thread.

The model is 64 stacked ``nn.Linear(32, 32)`` (no activation), batch 2, float32, LoRA r=8 / alpha=16 on every layer.
At this size the matmuls cost almost nothing, so what is measured is the per-call path itself: the Python and
autograd work each adapted layer adds. That is the cost users see on a GPU in the launch-bound regime (small
batches, generation). The floor is the same model with every weight frozen (the input requires grad, so backward
runs through every layer in all of them). "bare" is the least eager PyTorch can do for the same LoRA: the two
products written as bare torch calls on plain tensors (``addmm(base(x), x A^T, B^T, alpha=scaling)``), no modules. Each
measurement runs in its own process; rounds are interleaved.
Reported: the median over rounds of each process's median microseconds per step, and the added cost per adapted
layer, ``(step - floor) / 64``.

Usage::

    python benchmarks/per_call.py                               # 7 rounds, about a minute
    python benchmarks/per_call.py --rounds 15 --out benchmarks/results/per_call.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
import harness  # noqa: E402

LAYERS, WIDTH, BATCH, RANK, ALPHA = 64, 32, 2, 8, 16
NAMES = ("floor", "bare", "ours", "peft")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    targets = [str(i) for i in range(LAYERS)]
    if name == "floor":
        model.requires_grad_(False)
    elif name == "ours":
        from lightning_lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules=targets))
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    for layer in model.modules():  # B starts at zero in both: give it values so nothing is special-cased
        for container in ("lora_B",):
            params = getattr(layer, container, None)
            if isinstance(params, (nn.ParameterDict, nn.ModuleDict)):
                for value in params.values():
                    weight = value.weight if isinstance(value, nn.Linear) else value
                    nn.init.normal_(weight, std=0.01)
    return model


def bare_model() -> Callable[[torch.Tensor], torch.Tensor]:
    """The LoRA forward as bare torch calls on the same shapes (frozen W, b; trainable A, B with B non-zero)."""
    torch.manual_seed(0)
    weights = [(torch.randn(WIDTH, WIDTH) * 0.1, torch.zeros(WIDTH)) for _ in range(LAYERS)]
    factors = [(torch.randn(RANK, WIDTH, requires_grad=True), (torch.randn(WIDTH, RANK) * 0.01).requires_grad_())
               for _ in range(LAYERS)]  # fmt: skip

    def forward(x: torch.Tensor) -> torch.Tensor:
        for (weight, bias), (lora_A, lora_B) in zip(weights, factors):
            x = torch.addmm(torch.nn.functional.linear(x, weight, bias), x @ lora_A.t(), lora_B.t(), alpha=ALPHA / RANK)
        return x

    return forward


def worker(name: str, steps: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    model = bare_model() if name == "bare" else build(name)
    x = torch.randn(BATCH, WIDTH, requires_grad=True)

    def step() -> None:
        model(x).sum().backward()

    times = harness.time_steps(step, warmup, steps, clock=time.perf_counter)
    return {"us_per_step": statistics.median(times) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=NAMES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(harness.json.dumps(worker(args.worker, args.steps, args.warmup)))
        return
    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    results = harness.interleaved(__file__, NAMES, args.rounds, 1, extra)
    step = {name: harness.median_of(results[name], "us_per_step") for name in NAMES}
    added = {name: (step[name] - step["floor"]) / LAYERS for name in ("bare", "ours", "peft")}
    print(f"{'':6} {'us/step':>9} {'added us/layer':>15}")
    for name in NAMES:
        print(f"{name:6} {step[name]:9.0f} {added.get(name, 0.0):15.1f}")
    print(f"ours' added cost / PEFT's: {added['ours'] / added['peft']:.2f}")
    if args.out:
        harness.write_json(args.out, {
            "machine": harness.machine(), "rounds": args.rounds, "steps": args.steps, "us_per_step": step,
            "added_us_per_layer": added, "ratio_added_ours_to_peft": added["ours"] / added["peft"], "raw": results,
        })


if __name__ == "__main__":
    main()

"""PiSSA init: full SVD vs randomised ``pissa_niter_4``, lightning_lora vs HF PEFT, side by side in one run.

Measures the time to get an initialised adapted model (``apply_lora`` / ``peft.get_peft_model``, deep copy of the
base excluded) and the reconstruction error of the adapter's principal part, on

1. one 4096 x 4096 linear layer (``--size``), twice: with a Gaussian weight (a flat spectrum, the worst case for a
   randomised SVD) and with a weight whose singular values decay like ``1 / i`` (as in trained models; its SVD is
   known by construction, so no reference SVD is needed);
2. a ~100M-parameter Llama built from a config (``--layers``), every linear layer adapted.

Errors, per layer (Frobenius norms; ``W_r`` is the best rank-``r`` approximation of ``W``):

- ``principal_err = ||scaling * B @ A - W_r|| / ||W_r||``: 0 for the exact SVD; how far the fast SVD is from it.
- ``split_err = ||W_res + scaling * B @ A - W|| / ||W||``: whether base + adapter still equals the original weight.

Each run is timed in wall seconds and in CPU seconds of this process (``time.process_time``, all threads: what
other processes on a shared machine cannot inflate by taking the cores away). Fast inits run ``--repeats`` times
and report the fastest; the full SVD runs once. Speed-ups are ratios of CPU seconds. PEFT's full-SVD rows (the same ``torch.linalg.svd`` call as ours) double the longest part of the
run and are left out unless ``--peft-full`` is given. Prints a table and writes JSON (``--out``); 6 to 9 minutes
on 2 CPU cores, nearly all of it the two exact SVD rows (``--size 2048 --layers 4`` for a quick look).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
import harness  # noqa: E402

from lightning_lora import LoraConfig, apply_lora, lora_layers  # noqa: E402

FAST = "pissa_niter_4"


def timed(function: Callable[[], nn.Module]) -> tuple[nn.Module, tuple[float, float]]:
    """``(result, (wall seconds, CPU seconds))``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def ours(base: nn.Module, init: str, r: int, targets) -> tuple[nn.Module, tuple[float, float]]:
    model = copy.deepcopy(base)
    return timed(lambda: apply_lora(model, LoraConfig(r=r, alpha=r, target_modules=targets, init=init)))


def peft(base: nn.Module, init: str, r: int, targets) -> tuple[nn.Module, tuple[float, float]]:
    import peft as hf_peft

    model = copy.deepcopy(base)
    config = hf_peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=init)
    return timed(lambda: hf_peft.get_peft_model(model, config))


def fastest(run: Callable, base: nn.Module, init: str, r: int, targets, repeats: int) -> tuple[nn.Module, dict]:
    """The model of the last run, and the wall and CPU seconds of every run (``repeats`` runs for fast inits, one for
    the full SVD) with their minima."""
    samples = []
    for _ in range(repeats if init != "pissa" else 1):
        model, seconds = run(base, init, r, targets)
        samples.append(seconds)
    walls, cpus = zip(*samples)
    return model, {"seconds": min(walls), "cpu_seconds": min(cpus), "wall_samples": walls, "cpu_samples": cpus}


def adapter_parts(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (scaling * B @ A, residual base weight)}`` for our model or a PEFT model."""
    parts = {}
    if hasattr(model, "peft_config"):
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                parts[name] = (delta.detach(), module.get_base_layer().weight.detach())
        return parts
    for name, layer in lora_layers(model):
        delta = layer.scaling("default") * layer.lora_B["default"] @ layer.lora_A["default"]
        parts[name] = (delta.detach(), layer.weight.detach())
    return parts


def errors(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    originals: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor],
) -> dict[str, float]:
    principal, split = [], []
    for name, (delta, residual) in parts.items():
        principal.append(float(torch.linalg.norm(delta - best[name]) / torch.linalg.norm(best[name])))
        split.append(float(torch.linalg.norm(residual + delta - originals[name]) / torch.linalg.norm(originals[name])))
    return {
        "principal_err_mean": sum(principal) / len(principal),
        "principal_err_max": max(principal),
        "split_err_max": max(split),
    }


def one_layer(size: int, r: int, spectrum: str, peft_full: bool, repeats: int) -> list[dict]:
    """Rows for one ``size x size`` layer (Gaussian or decaying spectrum)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(size, size, bias=False))
    if spectrum == "decaying":
        U, _ = torch.linalg.qr(torch.randn(size, size))
        V, _ = torch.linalg.qr(torch.randn(size, size))
        S = 1.0 / torch.arange(1, size + 1, dtype=torch.float32)
        with torch.no_grad():
            base[0].weight.copy_((U * S) @ V.t())
        best: Optional[dict[str, torch.Tensor]] = {"0": (U[:, :r] * S[:r]) @ V[:, :r].t()}
        runs = [("lightning_lora", FAST, ours), ("peft", FAST, peft)]
    else:
        best = None  # from our exact PiSSA below
        runs = [("lightning_lora", "pissa", ours), ("lightning_lora", FAST, ours), ("peft", FAST, peft)]
        if peft_full:
            runs.insert(1, ("peft", "pissa", peft))
    originals = {"0": base[0].weight.detach().clone()}
    rows = []
    for library, init, run in runs:
        model, timing = fastest(run, base, init, r, ["0"], repeats)
        parts = adapter_parts(model)
        if best is None:
            best = {name: delta for name, (delta, _) in parts.items()}
        rows.append({"case": f"{size}x{size} {spectrum}", "library": library, "init": init, "layers": 1,
                     **timing, **errors(parts, originals, best)})
        del model
    return rows


def llama_100m(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def whole_model(layers: int, r: int, peft_full: bool, repeats: int) -> tuple[list[dict], int]:
    base = llama_100m(layers)
    parameters = sum(p.numel() for p in base.parameters())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    originals = {name: m.weight.detach().clone() for name, m in base.named_modules() if name.split(".")[-1] in targets}
    tokens = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference_logits = base(tokens).logits
    runs = [("lightning_lora", "pissa", ours), ("lightning_lora", FAST, ours), ("peft", FAST, peft)]
    if peft_full:
        runs.insert(1, ("peft", "pissa", peft))
    rows, best = [], None
    for library, init, run in runs:
        model, timing = fastest(run, base, init, r, targets, repeats)
        parts = adapter_parts(model)
        if best is None:
            best = {name: delta for name, (delta, _) in parts.items()}
        with torch.no_grad():
            output_err = float((model(tokens).logits - reference_logits).abs().max())
        rows.append({"case": f"Llama {parameters / 1e6:.0f}M", "library": library, "init": init,
                     "layers": len(parts), **timing, **errors(parts, originals, best),
                     "max_logit_change_at_init": output_err})
        del model
    return rows, parameters


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':<22}{'library':<16}{'init':<15}{'layers':>7}{'wall s':>9}{'CPU s':>9}{'principal_err':>15}"
              f"{'split_err':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['case']:<22}{row['library']:<16}{row['init']:<15}{row['layers']:>7}{row['seconds']:>9.3f}"
              f"{row['cpu_seconds']:>9.3f}{row['principal_err_mean']:>15.2e}{row['split_err_max']:>11.1e}")


def ratios(rows: list[dict]) -> dict[str, float]:
    """Speed-ups per case in CPU seconds: our full SVD / our fast, PEFT fast / our fast."""
    result = {}
    for case in dict.fromkeys(row["case"] for row in rows):
        seconds = {(row["library"], row["init"]): row["cpu_seconds"] for row in rows if row["case"] == case}
        fast = seconds[("lightning_lora", FAST)]
        if ("lightning_lora", "pissa") in seconds:
            result[f"{case}: full SVD / {FAST}"] = seconds[("lightning_lora", "pissa")] / fast
        result[f"{case}: PEFT {FAST} / ours {FAST}"] = seconds[("peft", FAST)] / fast
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="Side of the single square layer.")
    parser.add_argument("--layers", type=int, default=12, help="Decoder layers of the Llama (12: ~98M parameters).")
    parser.add_argument("--rank", type=int, default=16, help="Adapter rank r (alpha = r, scaling 1).")
    parser.add_argument("--peft-full", action="store_true", help="Also time PEFT's full SVD (the same LAPACK call).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each fast init; the fastest is reported.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "svd_init.json")
    args = parser.parse_args()

    rows = one_layer(args.size, args.rank, "gaussian", args.peft_full, args.repeats)
    rows += one_layer(args.size, args.rank, "decaying", args.peft_full, args.repeats)
    model_rows, parameters = whole_model(args.layers, args.rank, args.peft_full, args.repeats)
    rows += model_rows
    print_table(rows)
    speedups = ratios(rows)
    for name, value in speedups.items():
        print(f"{name}: {value:.1f}x")
    max_change = max(row["max_logit_change_at_init"] for row in model_rows)
    print(f"largest logit change at init over the Llama runs: {max_change:.1e}")

    environment = {**harness.machine(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    harness.write_json(args.out, {"rank": args.rank, "size": args.size, "llama_parameters": parameters,
                                  "environment": environment, "rows": rows, "speedups": speedups})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

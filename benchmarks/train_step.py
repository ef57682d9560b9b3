"""Training-step cost of LoRA and DoRA: lightning_lora vs HF PEFT vs the floor, side by side in one run.

The model is a transformers Llama built from a config (768 hidden, 2048 intermediate, 6 layers, 12 heads,
32000 vocab, fp32), batch 4 x 128 tokens, r=16 / alpha=32 on all linear layers, AdamW. The floor is the same
model with every weight frozen but input gradients flowing: the cost LoRA cannot avoid. Each measurement runs in
its own process with fixed threads; rounds are interleaved. Reported: median CPU seconds per step (process time)
and peak RSS, as ratios.

Usage::

    python benchmarks/train_step.py                 # full run (about 10 minutes on 2 cores)
    python benchmarks/train_step.py --rounds 1 --steps 2 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAMES = ["floor", "peft-lora", "ours-lora", "peft-dora", "ours-dora"]
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"


def build_model(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
        num_key_value_heads=12, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    use_dora = name.endswith("dora")
    if name == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif name.startswith("peft"):
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=use_dora)
        )
    else:
        from lightning_lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=use_dora))
    return model.train()


def worker(name: str, threads: int, warmup: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    model = build_model(name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    tokens = torch.randint(0, 32000, (4, 128), generator=torch.Generator().manual_seed(0))
    rss_before = harness.current_rss_mb()

    def step() -> None:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = harness.time_steps(step, warmup, steps)
    return {
        "step_cpu_s": sorted(times)[len(times) // 2],
        "peak_rss_mb": harness.peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "trainable_params": sum(p.numel() for p in trainable),
    }


def report(results: dict[str, list[dict]]) -> dict:
    med = {name: {k: harness.median_of(rs, k) for k in rs[0]} for name, rs in results.items()}
    floor, rows = med["floor"], {}
    for name, values in med.items():
        peft_name = name.replace("ours", "peft")
        row = {
            **values,
            "cpu_vs_floor": values["step_cpu_s"] / floor["step_cpu_s"],
            "peak_vs_floor": values["peak_rss_mb"] / floor["peak_rss_mb"],
            "peak_minus_floor_mb": values["peak_rss_mb"] - floor["peak_rss_mb"],
        }
        if name.startswith("ours"):
            row["cpu_vs_peft"] = values["step_cpu_s"] / med[peft_name]["step_cpu_s"]
            row["peak_vs_peft"] = values["peak_rss_mb"] / med[peft_name]["peak_rss_mb"]
        rows[name] = row
    if "ours-lora" in rows and "ours-dora" in rows:
        rows["ours-dora"]["peak_vs_ours_lora"] = rows["ours-dora"]["peak_rss_mb"] / rows["ours-lora"]["peak_rss_mb"]
    header = f"{'run':<10} {'CPU s/step':>10} {'vs floor':>9} {'vs PEFT':>8} {'peak MB':>8} {'vs floor':>9} {'vs PEFT':>8}"
    print(header)
    for name, row in rows.items():
        print(
            f"{name:<10} {row['step_cpu_s']:>10.3f} {row['cpu_vs_floor']:>8.3f}x "
            f"{row.get('cpu_vs_peft', float('nan')):>7.3f}x {row['peak_rss_mb']:>8.0f} "
            f"{row['peak_vs_floor']:>8.3f}x {row.get('peak_vs_peft', float('nan')):>7.3f}x"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=NAMES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=NAMES, help="subset of runs (floor is always included)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.warmup, args.steps)))
        return
    names = ["floor"] + [n for n in args.only if n != "floor"]
    extra = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    results = harness.interleaved(__file__, names, args.rounds, args.threads, extra)
    rows = report(results)
    harness.write_json(
        RESULTS,
        {"machine": harness.machine(), "settings": vars(args), "medians": rows, "raw": results},
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

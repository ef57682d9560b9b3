"""Training-step cost of each adapter kind: lightning_lora vs HF PEFT vs the floor, side by side in one run.

The model is a transformers Llama built from a config (768 hidden, 2048 intermediate, 6 layers, 12 heads,
32000 vocab, fp32), batch 4 x 128 tokens, AdamW, adapters on all linear layers: LoRA and DoRA r=16 / alpha=32,
LoHa r=8 / alpha=16 and LoKr r=16 / alpha=32 (PEFT's defaults otherwise), OFT with 32-wide blocks, VeRA r=256,
BOFT with 32-wide blocks and 2 butterfly factors, VB-LoRA with PEFT's defaults (r=4, 256 vectors of 256, top-2).
The floor is the same model with every weight frozen but input gradients flowing: the cost LoRA cannot avoid. Each
measurement runs in its own process with fixed threads (every process imports the same libraries, so resident
memory starts from the same baseline); rounds are interleaved. Reported: the best and the median CPU seconds per step
(process time) and the peak RSS, as ratios; and the MiB of activations autograd saves for the backward pass. With
``--device cuda`` the steps are timed in wall seconds up to a synchronisation and the peak is the GPU memory torch
allocated (``max_memory_allocated``), not RSS.

Usage::

    python benchmarks/train_step.py                 # full run (about 15 minutes)
    python benchmarks/train_step.py --rounds 1 --steps 2 --warmup 1   # smoke run
    python benchmarks/train_step.py --only peft-lora ours-lora --rounds 5 \
        --out benchmarks/results/train_step_lora_5rounds.json
    python benchmarks/train_step.py --only peft-loha ours-loha peft-lokr ours-lokr peft-oft ours-oft \
        --out benchmarks/results/train_step_kinds.json
    python benchmarks/train_step.py --only ours-lora peft-lora floor-ckpt ours-lora-ckpt peft-lora-ckpt \
        --out benchmarks/results/train_step_checkpointing.json   # activation checkpointing
    python benchmarks/train_step.py --device cuda --only peft-lora ours-lora peft-dora ours-dora   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
import harness  # noqa: E402

KINDS = ["lora", "dora", "loha", "lokr", "oft", "vera", "boft", "vblora"]
NAMES = ["floor", *(f"{side}-{kind}" for kind in KINDS for side in ("peft", "ours"))]
# The same runs with Hugging Face activation checkpointing (non-reentrant): pick them with --only.
CHECKPOINTED = ["floor-ckpt", "peft-lora-ckpt", "ours-lora-ckpt"]
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"


def benchmark_llama() -> torch.nn.Module:
    """The benchmark model: a 92M-parameter Llama built from a config, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
        num_key_value_heads=12, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def build_model(name: str) -> torch.nn.Module:
    model = benchmark_llama()
    if name.endswith("-ckpt"):
        name = name.removesuffix("-ckpt")
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kind = name.split("-", 1)[-1]
    if name == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif name.startswith("peft"):
        import peft

        peft_configs = {
            "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            "dora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True),
            "loha": lambda: peft.LoHaConfig(r=8, alpha=16, target_modules="all-linear"),
            "lokr": lambda: peft.LoKrConfig(r=16, alpha=32, target_modules="all-linear"),
            "oft": lambda: peft.OFTConfig(oft_block_size=32, target_modules="all-linear"),
            "vera": lambda: peft.VeraConfig(r=256, target_modules="all-linear"),
            "boft": lambda: peft.BOFTConfig(boft_block_size=32, boft_n_butterfly_factor=2, target_modules="all-linear"),
            "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=256, target_modules="all-linear"),
        }
        if kind == "boft":  # PEFT's butterfly factors need its CUDA extension: give it the same op in torch
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from peft_boft import use_torch_block_diag_in_peft

            use_torch_block_diag_in_peft()
        model = peft.get_peft_model(model, peft_configs[kind]())
    else:
        from lightning_lora import (
            BOFTConfig,
            LoHaConfig,
            LoKrConfig,
            LoraConfig,
            OFTConfig,
            VBLoRAConfig,
            VeraConfig,
            apply_lora,
        )

        our_configs = {
            "lora": lambda: LoraConfig(r=16, alpha=32, target_modules="all-linear"),
            "dora": lambda: LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=True),
            "loha": lambda: LoHaConfig(r=8, alpha=16, target_modules="all-linear"),
            "lokr": lambda: LoKrConfig(r=16, alpha=32, target_modules="all-linear"),
            "oft": lambda: OFTConfig(oft_block_size=32, target_modules="all-linear"),
            "vera": lambda: VeraConfig(r=256, target_modules="all-linear"),
            "boft": lambda: BOFTConfig(boft_block_size=32, boft_n_butterfly_factor=2, target_modules="all-linear"),
            "vblora": lambda: VBLoRAConfig(r=4, num_vectors=256, vector_length=256, target_modules="all-linear"),
        }
        apply_lora(model, our_configs[kind]())
    return model.train()


def worker(name: str, threads: int, warmup: int, steps: int, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    # Every worker imports the same libraries, so resident-memory readings start from the same baseline.
    import lightning_lora  # noqa: F401
    import peft  # noqa: F401

    model = build_model(name).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    tokens = torch.randint(0, 32000, (4, 128), generator=torch.Generator().manual_seed(0)).to(device)
    rss_before = harness.current_rss_mb()
    cuda = device.startswith("cuda")

    def step() -> None:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    times = harness.time_steps(step, warmup, steps, clock=time.perf_counter if cuda else time.process_time)
    saved = saved_for_backward_mib(model, tokens)
    return {
        "step_cpu_s": sorted(times)[len(times) // 2],
        "step_cpu_min_s": min(times),
        "peak_rss_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else harness.peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "trainable_params": sum(p.numel() for p in trainable),
        "saved_for_backward_mib": saved,
    }


def saved_for_backward_mib(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """MiB of distinct tensor storages autograd keeps from one forward for the backward pass, parameters
    excluded: the activation memory a method adds."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def report(results: dict[str, list[dict]]) -> dict:
    """Per run: the best step over all rounds (noise on a shared machine only adds time) and the median of the
    rounds' medians; peak RSS as the median over rounds. Ratios against the floor and against PEFT."""
    rows = {}
    for name, rounds in results.items():
        rows[name] = {
            "step_cpu_best_s": min(r["step_cpu_min_s"] for r in rounds),
            "step_cpu_median_s": harness.median_of(rounds, "step_cpu_s"),
            "peak_rss_mb": harness.median_of(rounds, "peak_rss_mb"),
            "saved_for_backward_mib": harness.median_of(rounds, "saved_for_backward_mib"),
            "trainable_params": rounds[0]["trainable_params"],
        }
    floor = rows["floor"]
    for name, row in rows.items():
        for key in ("step_cpu_best_s", "step_cpu_median_s", "peak_rss_mb"):
            row[f"{key}_vs_floor"] = row[key] / floor[key]
            peft_row = rows.get(name.replace("ours", "peft"))
            if name.startswith("ours") and peft_row is not None:
                row[f"{key}_vs_peft"] = row[key] / peft_row[key]
        row["peak_minus_floor_mb"] = row["peak_rss_mb"] - floor["peak_rss_mb"]
    if "ours-lora" in rows and "ours-dora" in rows:
        rows["ours-dora"]["peak_vs_ours_lora"] = rows["ours-dora"]["peak_rss_mb"] / rows["ours-lora"]["peak_rss_mb"]
    print(f"{'run':<10} {'best CPU s':>10} {'vs floor':>9} {'vs PEFT':>8} {'median s':>9} {'vs floor':>9} "
          f"{'vs PEFT':>8} {'peak MB':>8} {'vs floor':>9} {'vs PEFT':>8} {'saved MiB':>9}")
    nan = float("nan")
    for name, row in rows.items():
        print(
            f"{name:<10} {row['step_cpu_best_s']:>10.3f} {row['step_cpu_best_s_vs_floor']:>8.3f}x "
            f"{row.get('step_cpu_best_s_vs_peft', nan):>7.3f}x {row['step_cpu_median_s']:>9.3f} "
            f"{row['step_cpu_median_s_vs_floor']:>8.3f}x {row.get('step_cpu_median_s_vs_peft', nan):>7.3f}x "
            f"{row['peak_rss_mb']:>8.0f} {row['peak_rss_mb_vs_floor']:>8.3f}x {row.get('peak_rss_mb_vs_peft', nan):>7.3f}x "
            f"{row['saved_for_backward_mib']:>9.0f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=NAMES + CHECKPOINTED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=NAMES, help="subset of runs (floor is always included)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: wall time and allocated GPU memory")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.warmup, args.steps, args.device)))
        return
    names = ["floor"] + [n for n in args.only if n != "floor"]
    extra = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]
    results = harness.interleaved(__file__, names, args.rounds, args.threads, extra)
    rows = report(results)
    harness.write_json(
        args.out,
        {"machine": harness.machine(), "settings": {**vars(args), "out": str(args.out)}, "medians": rows,
         "raw": results},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""QLoRA benchmark: base-model memory and training-step time of a bitsandbytes-quantised base against the same
model with plain LoRA, plus LoftQ's reconstruction error against plain quantisation.

Every measurement runs in its own fresh process (``--worker NAME``); rounds are interleaved and medians reported.
Times are CPU seconds of the process (``time.process_time``) with one thread, which keeps them comparable on a busy
machine. Nothing is downloaded: the model is a Llama built from a config with random weights.

    python benchmarks/qlora.py                 # table on stdout, JSON in benchmarks/results/qlora.json
    python benchmarks/qlora.py --rounds 1 --steps 3 --hidden 256   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_lora import LoraConfig, QuantizationConfig, apply_lora, lora_layers, quantized_layers  # noqa: E402
from lightning_lora.core.base_weights import dense_weight  # noqa: E402

VARIANTS: dict[str, QuantizationConfig | None] = {
    "lora-fp32": None,
    "qlora-nf4": QuantizationConfig(bits=4, quant_type="nf4", layers="all-linear"),
    "qlora-nf4-double": QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, layers="all-linear"),
    "qlora-nf4-bf16": QuantizationConfig(bits=4, quant_type="nf4", compute_dtype="bfloat16", layers="all-linear"),
    "qlora-int8": QuantizationConfig(bits=8, layers="all-linear"),
}
LOFTQ_INITS = ["loftq", "loftq_iter_2", "loftq_iter_5"]


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def base_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the base model (adapters excluded): all of it, and its linear layers (quantisation statistics in)."""
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in layer.lora_A.values()}
    adapter_ids |= {id(p) for _, layer in lora_layers(model) for p in layer.lora_B.values()}
    base = [p for p in model.parameters() if id(p) not in adapter_ids] + list(model.buffers())
    linear_modules = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name]
    linear = [m.weight for m in linear_modules] + [m.bias for m in linear_modules if m.bias is not None]
    stats = []
    for _, module in quantized_layers(model):
        state = getattr(module.weight, "quant_state", None)
        if state is None:  # 8 bit: one float32 scale per row
            stats.append(module.weight.SCB if module.weight.SCB is not None else module.state.SCB)
            continue
        stats += [state.absmax, state.code]
        if state.nested:
            stats += [state.state2.absmax, state.state2.code]
    return {"model_bytes": tensor_bytes(base) + tensor_bytes(stats), "linear_bytes": tensor_bytes(linear + stats)}


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return statistics.median(times)


def train_worker(name: str, args: argparse.Namespace) -> dict:
    model = build_model(args)
    apply_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, quantization=VARIANTS[name]))
    memory = base_memory(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def train_step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_step() -> None:
        with torch.no_grad():
            model(input_ids=tokens)

    model.train()
    result = {"name": name, **memory, "train_step_s": timed(train_step, args.warmup, args.steps)}
    model.eval()
    result["eval_forward_s"] = timed(eval_step, 1, args.steps)
    if name.startswith("qlora-nf4"):
        # What the CPU repack that keep_training_layout switches off would have given for inference only.
        for _, module in quantized_layers(model):
            module.support_avx512bf16_for_cpu = True
        result["eval_forward_bnb_repacked_s"] = timed(eval_step, 1, args.steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


def loftq_worker(args: argparse.Namespace) -> dict:
    """Relative Frobenius error ||W - base - adapter|| / ||W|| over all linear layers, per init and rank."""
    weights = {n: m.weight.detach().clone() for n, m in build_model(args).named_modules() if isinstance(m, nn.Linear)}
    norm = sum(w.norm() ** 2 for w in weights.values()) ** 0.5
    result: dict = {"name": "loftq"}
    for rank in args.loftq_ranks:
        for init in ["kaiming", *LOFTQ_INITS]:
            model = build_model(args)
            options = QuantizationConfig(bits=4, quant_type="nf4")
            start = time.process_time()
            apply_lora(model, LoraConfig(r=rank, alpha=2 * rank, init=init, quantization=options))
            seconds = time.process_time() - start
            error = 0.0
            for layer_name, layer in lora_layers(model):
                approx = dense_weight(layer).float() + layer.delta_weight("default")
                error += ((weights[layer_name] - approx).norm() ** 2).item()
            label = "qlora" if init == "kaiming" else init
            result[f"r{rank}/{label}"] = {"relative_error": error**0.5 / norm.item(), "init_cpu_s": seconds}
    return result


def run_worker(name: str, argv: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", name, *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--loftq-ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-loftq", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "qlora.json")
    args = parser.parse_args()
    if args.worker is not None:
        torch.set_num_threads(1)
        result = loftq_worker(args) if args.worker == "loftq" else train_worker(args.worker, args)
        print(json.dumps(result))
        return

    passthrough = [f"--{key}={getattr(args, key)}" for key in ("hidden", "layers", "vocab", "seq", "batch", "rank")]
    passthrough += [f"--warmup={args.warmup}", f"--steps={args.steps}", "--loftq-ranks", *map(str, args.loftq_ranks)]
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(args.rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            runs[name].append(run_worker(name, passthrough))
            print(f"round {round_index + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = "lora-fp32"
    rows = []
    for name in VARIANTS:
        row = {key: median(name, key) for key in runs[name][0] if key != "name"}
        row["model_bytes_vs_fp32"] = row["model_bytes"] / median(base, "model_bytes")
        row["linear_bytes_vs_fp32"] = row["linear_bytes"] / median(base, "linear_bytes")
        row["train_step_vs_lora"] = row["train_step_s"] / median(base, "train_step_s")
        row["eval_forward_vs_lora"] = row["eval_forward_s"] / median(base, "eval_forward_s")
        rows.append({"name": name, **row})

    print(f"\nLlama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, batch {args.batch}x{args.seq}, "
          f"LoRA r={args.rank} on all linear layers, 1 thread, median of {args.rounds} processes")
    header = f"{'variant':18} {'linear MB':>10} {'x fp32':>7} {'model MB':>9} {'x fp32':>7} {'step s':>8} " \
             f"{'x LoRA':>7} {'eval s':>7} {'x LoRA':>7} {'peak RSS MB':>12}"
    print(header)
    for row in rows:
        print(f"{row['name']:18} {row['linear_bytes'] / 2**20:10.2f} {row['linear_bytes_vs_fp32']:7.3f} "
              f"{row['model_bytes'] / 2**20:9.2f} {row['model_bytes_vs_fp32']:7.3f} {row['train_step_s']:8.3f} "
              f"{row['train_step_vs_lora']:7.2f} {row['eval_forward_s']:7.3f} {row['eval_forward_vs_lora']:7.2f} "
              f"{row['peak_rss_mb']:12.0f}")
        if "eval_forward_bnb_repacked_s" in row:
            print(f"{'':18} eval with bitsandbytes' CPU repack (no gradients afterwards): "
                  f"{row['eval_forward_bnb_repacked_s']:.3f} s")

    loftq = None if args.skip_loftq else run_worker("loftq", passthrough)
    if loftq is not None:
        print("\nLoftQ (NF4): relative error ||W - (base + adapter)|| / ||W|| over all linear layers")
        for rank in args.loftq_ranks:
            plain = loftq[f"r{rank}/qlora"]["relative_error"]
            cells = [f"QLoRA {plain:.4f}"]
            for init in LOFTQ_INITS:
                value = loftq[f"r{rank}/{init}"]
                cells.append(f"{init} {value['relative_error']:.4f} ({value['relative_error'] / plain:.3f}x, "
                             f"init {value['init_cpu_s']:.1f} s)")
            print(f"  r={rank}: " + " | ".join(cells))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "results": rows,
        "loftq": loftq,
        "runs": runs,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

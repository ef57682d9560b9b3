"""QLoRA: base-model memory and training-step cost of a bitsandbytes-quantised base against the same model with
plain LoRA (same model, same batch), plus LoftQ's reconstruction error against plain quantisation.

The model is a transformers Llama built from a config (random weights, nothing downloaded): 512 hidden, 1536
intermediate, 4 layers, 8 heads, 2048 vocab, fp32; batch 4 x 128 tokens; r=16 / alpha=32 on all linear layers;
AdamW. Quantised runs quantise every linear layer but the output head. Each measurement runs in its own process
with fixed threads; rounds are interleaved. Reported: bytes of the base model (adapters excluded, quantisation
statistics included), median CPU seconds per training step and per no-grad eval forward (process time), peak RSS,
as ratios to the unquantised LoRA run.

Usage::

    python benchmarks/qlora.py                  # full run (about 15 minutes on 2 cores)
    python benchmarks/qlora.py --rounds 1 --steps 2 --warmup 1 --loftq-ranks 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from lightning_lora import LoraConfig, QuantizationConfig, apply_lora, lora_layers, quantized_layers  # noqa: E402
from lightning_lora.core.common.base_weights import dense_weight  # noqa: E402

QUANTIZATION = {
    "lora-fp32": None,
    "qlora-nf4": QuantizationConfig(bits=4, quant_type="nf4", layers="all-linear"),
    "qlora-nf4-double": QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, layers="all-linear"),
    "qlora-nf4-bf16": QuantizationConfig(bits=4, quant_type="nf4", compute_dtype="bfloat16", layers="all-linear"),
    "qlora-int8": QuantizationConfig(bits=8, layers="all-linear"),
}
NAMES = list(QUANTIZATION)
LOFTQ_INITS = ["loftq", "loftq_iter_2", "loftq_iter_5"]
VOCAB = 2048
RESULTS = Path(__file__).resolve().parent / "results" / "qlora.json"


def build_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def base_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the base model (adapters excluded) and of its linear layers, quantisation statistics included."""
    adapter = {id(p) for _, layer in lora_layers(model) for p in [*layer.lora_A.values(), *layer.lora_B.values()]}
    base = [p for p in model.parameters() if id(p) not in adapter] + list(model.buffers())
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    linear = [m.weight for m in linears] + [m.bias for m in linears if m.bias is not None]
    statistics = []
    for _, module in quantized_layers(model):
        state = getattr(module.weight, "quant_state", None)
        if state is None:  # 8 bit: one float32 scale per output row
            statistics.append(module.weight.SCB if module.weight.SCB is not None else module.state.SCB)
            continue
        statistics += [state.absmax, state.code]
        if state.nested:
            statistics += [state.state2.absmax, state.state2.code]
    extra = tensor_bytes(statistics)
    return {"base_bytes": tensor_bytes(base) + extra, "linear_bytes": tensor_bytes(linear) + extra}


def train_worker(name: str, threads: int, warmup: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    model = build_model()
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear", quantization=QUANTIZATION[name]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(0))

    def train_step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_forward() -> None:
        with torch.no_grad():
            model(input_ids=tokens)

    result = {**base_bytes(model), "trainable_params": sum(p.numel() for p in trainable)}
    model.train()
    result["step_cpu_s"] = harness.median_of([{"t": t} for t in harness.time_steps(train_step, warmup, steps)], "t")
    model.eval()
    result["eval_cpu_s"] = harness.median_of([{"t": t} for t in harness.time_steps(eval_forward, 1, steps)], "t")
    if QUANTIZATION[name] is not None and QUANTIZATION[name].bits == 4:
        # bitsandbytes' CPU inference repack, which keep_training_layout switches off (after it the layers pass no
        # gradient to their input); measured last, for what it would give an inference-only run.
        for _, module in quantized_layers(model):
            module.support_avx512bf16_for_cpu = True
        times = harness.time_steps(eval_forward, 1, steps)
        result["eval_bnb_repacked_cpu_s"] = harness.median_of([{"t": t} for t in times], "t")
    result["peak_rss_mb"] = harness.peak_rss_mb()
    return result


def loftq_worker(threads: int, ranks: list[int]) -> dict:
    """Relative Frobenius error ``||W - (base + adapter)|| / ||W||`` over all adapted layers, per rank and init."""
    torch.set_num_threads(threads)
    weights = {n: m.weight.detach().clone() for n, m in build_model().named_modules() if isinstance(m, nn.Linear)}
    result = {}
    for rank in ranks:
        for init in ["kaiming", *LOFTQ_INITS]:
            model = build_model()
            config = LoraConfig(r=rank, alpha=2 * rank, init=init, quantization=QuantizationConfig(quant_type="nf4"))
            start = time.process_time()
            apply_lora(model, config)
            seconds = time.process_time() - start
            error = norm = 0.0
            for name, layer in lora_layers(model):
                approximation = dense_weight(layer).float() + layer.delta_weight("default")
                error += (weights[name] - approximation).square().sum().item()
                norm += weights[name].square().sum().item()
            label = "qlora" if init == "kaiming" else init
            result[f"r{rank}/{label}"] = {"relative_error": (error / norm) ** 0.5, "apply_lora_cpu_s": seconds}
    return result


def report(results: dict[str, list[dict]]) -> dict:
    medians = {name: {k: harness.median_of(rs, k) for k in rs[0]} for name, rs in results.items()}
    lora = medians["lora-fp32"]
    rows = {}
    for name, values in medians.items():
        rows[name] = {
            **values,
            "base_vs_fp32": values["base_bytes"] / lora["base_bytes"],
            "linear_vs_fp32": values["linear_bytes"] / lora["linear_bytes"],
            "step_vs_lora": values["step_cpu_s"] / lora["step_cpu_s"],
            "eval_vs_lora": values["eval_cpu_s"] / lora["eval_cpu_s"],
            "peak_vs_lora": values["peak_rss_mb"] / lora["peak_rss_mb"],
        }
    print(
        f"{'run':<17} {'linear MB':>9} {'vs fp32':>8} {'base MB':>8} {'vs fp32':>8} {'CPU s/step':>10} "
        f"{'vs LoRA':>8} {'eval s':>7} {'vs LoRA':>8} {'peak MB':>8} {'vs LoRA':>8}"
    )
    for name, row in rows.items():
        print(
            f"{name:<17} {row['linear_bytes'] / 2**20:>9.2f} {row['linear_vs_fp32']:>7.3f}x "
            f"{row['base_bytes'] / 2**20:>8.2f} {row['base_vs_fp32']:>7.3f}x {row['step_cpu_s']:>10.3f} "
            f"{row['step_vs_lora']:>7.3f}x {row['eval_cpu_s']:>7.3f} {row['eval_vs_lora']:>7.3f}x "
            f"{row['peak_rss_mb']:>8.0f} {row['peak_vs_lora']:>7.3f}x"
        )
    for name, row in rows.items():
        if "eval_bnb_repacked_cpu_s" in row:
            print(f"  {name}: eval with bitsandbytes' CPU repack {row['eval_bnb_repacked_cpu_s']:.3f} s "
                  f"({row['eval_bnb_repacked_cpu_s'] / row['eval_cpu_s']:.2f}x of the trainable layout)")
    return rows


def report_loftq(loftq: dict, ranks: list[int]) -> None:
    print("\nLoftQ, NF4: relative error ||W - (base + adapter)|| / ||W|| over all adapted layers")
    for rank in ranks:
        plain = loftq[f"r{rank}/qlora"]["relative_error"]
        cells = [f"QLoRA {plain:.4f}"]
        for init in LOFTQ_INITS:
            value = loftq[f"r{rank}/{init}"]
            cells.append(
                f"{init} {value['relative_error']:.4f} ({value['relative_error'] / plain:.3f}x, "
                f"apply_lora {value['apply_lora_cpu_s']:.1f} s)"
            )
        print(f"  r={rank}: " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=[*NAMES, "loftq"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loftq-ranks", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    if args.worker == "loftq":
        print(json.dumps(loftq_worker(args.threads, args.loftq_ranks)))
        return
    if args.worker:
        print(json.dumps(train_worker(args.worker, args.threads, args.warmup, args.steps)))
        return
    extra = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    results = harness.interleaved(__file__, NAMES, args.rounds, args.threads, extra)
    rows = report(results)
    ranks = ["--loftq-ranks", *map(str, args.loftq_ranks)]
    loftq = harness.run_worker(__file__, "loftq", args.threads, ranks)
    report_loftq(loftq, args.loftq_ranks)
    payload = {"machine": harness.machine(), "settings": vars(args), "medians": rows, "loftq": loftq, "raw": results}
    harness.write_json(RESULTS, payload)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

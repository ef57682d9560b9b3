"""FSDP-QLoRA against DDP-QLoRA: what each of two ranks holds when FSDP2 shards the 4-bit base, and what a step costs.

The model is a transformers Llama built from a config (random weights, nothing downloaded): 1024 hidden, 2816
intermediate, 6 layers, 16 heads, 4096 vocab, fp32; NF4 with double quantisation on every linear layer but the head;
r=16 / alpha=32 LoRA on all linear layers; AdamW; 2 x 128 tokens per rank. Two CPU processes on gloo, one thread
each; FSDP2 shards each decoder layer and the root (``fully_shard``), DDP wraps the model. The full-precision LoRA
model under the same two strategies is the reference.

Per rank it reports the bytes it holds (local shards only): the frozen base (packed 4-bit weights, the quantisation
statistics kept beside them, embeddings, norms, head), the adapters with their gradients and AdamW state; the growth
of resident memory over the training steps (peak RSS reset before them); and the median CPU seconds per step. Every
rank must end with the same loss in both strategies (reported: the largest difference).

Usage::

    python benchmarks/fsdp_qlora.py                # about 3 minutes on 2 cores
    python benchmarks/fsdp_qlora.py --steps 2      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from lightning_lora import LoraConfig, QuantizationConfig, apply_lora, lora_param_groups  # noqa: E402
from lightning_lora.core.common.distributed import is_dtensor  # noqa: E402
from lightning_lora.core.quantization.quantized_weights import quantized_layers  # noqa: E402

NF4 = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, layers="all-linear")
RUNS = {"ddp-qlora": ("ddp", NF4), "fsdp2-qlora": ("fsdp2", NF4), "ddp-lora": ("ddp", None),
        "fsdp2-lora": ("fsdp2", None)}
VOCAB = 4096
RESULTS = Path(__file__).resolve().parent / "results" / "fsdp_qlora.json"


def build_model(quantization: QuantizationConfig | None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    return apply_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear", quantization=quantization))


def local_bytes(tensors: list[torch.Tensor]) -> int:
    local = [t.to_local() if is_dtensor(t) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def quantization_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The absmax/code tensors of every 4-bit layer: on the weight, or on the module once FSDP2 sharded it."""
    tensors = []
    for _, module in quantized_layers(model):
        state = getattr(module.weight, "quant_state", None) or module.quant_state
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
    return tensors


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident set size


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def worker(rank: int, name: str, steps: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    strategy, quantization = RUNS[name]
    model = build_model(quantization)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(lora_param_groups(model, lr=1e-4))
    tokens = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(rank))
    losses, times = [], []
    peak_rss_reset()
    rss_before = harness.current_rss_mb()
    for _ in range(steps):
        start = time.process_time()
        loss = wrapped(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
        losses.append(loss.item())
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    moments = [v for p in trainable for v in optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0]
    result = {
        "rank": rank,
        "base_mb": (local_bytes(frozen) + local_bytes(quantization_statistics(model))) / 2**20,
        "quantization_statistics_mb": local_bytes(quantization_statistics(model)) / 2**20,
        "adapter_and_optimizer_mb": (local_bytes(trainable) * 2 + local_bytes(moments)) / 2**20,  # + gradients
        "step_rss_growth_mb": peak_rss_mb() - rss_before,
        "step_cpu_s": statistics.median(times[1:] or times),
        "final_loss": losses[-1],
    }
    queue.put(result)
    dist.destroy_process_group()


def run(name: str, steps: int, port: int) -> list[dict]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=worker, args=(rank, name, steps, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = sorted((queue.get() for _ in processes), key=lambda r: r["rank"])
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{name}: a rank exited with {process.exitcode}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {name: run(name, args.steps, 29600 + index) for index, name in enumerate(RUNS)}
    print(f"{'run':<12} {'base MB/rank':>12} {'quant stats':>11} {'adapter+opt':>11} {'step RSS+ MB':>12} "
          f"{'step s':>7} {'loss r0 / r1':>17}")
    for name, ranks in results.items():
        r0 = ranks[0]
        print(f"{name:<12} {r0['base_mb']:>12.1f} {r0['quantization_statistics_mb']:>11.2f} "
              f"{r0['adapter_and_optimizer_mb']:>11.1f} {max(r['step_rss_growth_mb'] for r in ranks):>12.0f} "
              f"{statistics.mean(r['step_cpu_s'] for r in ranks):>7.2f} "
              f"{ranks[0]['final_loss']:>8.5f}/{ranks[1]['final_loss']:.5f}")
    def mean(name: str, key: str) -> float:
        return statistics.mean(rank[key] for rank in results[name])

    ratios = {
        f"{key}_fsdp2_vs_ddp_{quantized}": mean(f"fsdp2-{quantized}", key) / mean(f"ddp-{quantized}", key)
        for key in ("base_mb", "step_rss_growth_mb", "step_cpu_s")
        for quantized in ("qlora", "lora")
    }
    ratios["base_mb_fsdp2_qlora_vs_ddp_lora"] = mean("fsdp2-qlora", "base_mb") / mean("ddp-lora", "base_mb")
    ratios["final_loss_max_difference_fsdp2_vs_ddp"] = max(
        abs(a["final_loss"] - b["final_loss"])
        for q in ("qlora", "lora")
        for a, b in zip(results[f"fsdp2-{q}"], results[f"ddp-{q}"])
    )
    print(json.dumps(ratios, indent=1))
    harness.write_json(args.out, {"machine": harness.machine(), "steps": args.steps, "results": results,
                                  "ratios": ratios})


if __name__ == "__main__":
    main()

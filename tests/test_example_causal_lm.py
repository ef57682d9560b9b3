"""The causal-LM example: prompts that mask all but the answer, and the LoraMixin config end to end on a tiny
Llama (the SmolLM2 config with the model swapped), with the exported adapter read back by Hugging Face PEFT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from example_assets import write_tiny_causal_lm, write_tiny_tweets
from lightning_lora.lightning.cli import LoraLightningCLI
from lightning_lora_examples.smollm2 import IGNORE_INDEX, PromptedTweets, prompt
from lightning_lora_examples.tweets import LABELS, read_tweets
from numerics import assert_parity

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "configs" / "smollm2_loraplus.yaml"


def test_prompted_tweets_learn_only_the_answer_tokens(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_causal_lm(tmp_path / "llama"))
    tweets = read_tweets(write_tiny_tweets(tmp_path / "t.csv", rows=6))[:3]
    dataset = PromptedTweets(tweets, tokenizer, max_length=32)
    batch = dataset.collate([dataset[i] for i in range(3)])
    for row, tweet in enumerate(tweets):
        prompt_length = len(tokenizer(prompt(tweet.text), add_special_tokens=False)["input_ids"])
        answer = tokenizer(" " + LABELS[tweet.label], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert int(batch["answer_start"][row]) == prompt_length
        labels = batch["labels"][row]
        assert (labels[:prompt_length] == IGNORE_INDEX).all()
        assert labels[prompt_length : prompt_length + len(answer)].tolist() == answer
        assert (labels[prompt_length + len(answer) :] == IGNORE_INDEX).all()  # padding
        assert int(batch["class_labels"][row]) == tweet.label


def test_mixin_config_trains_a_causal_lm_and_exports_an_adapter_peft_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = write_tiny_causal_lm(tmp_path / "llama")
    corpus = write_tiny_tweets(tmp_path / "t.csv", rows=40)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    cli = LoraLightningCLI(args=[
        "fit", f"--config={SMOLLM2_CONFIG}", f"--model.init_args.model_path={model_dir}",
        f"--data.init_args.model_path={model_dir}", f"--data.init_args.csv_path={corpus}",
        "--data.init_args.train_size=16", "--data.init_args.val_size=8", "--data.init_args.test_size=8",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])
    assert cli.trainer.global_step == 2
    groups = {group["name"]: group["lr"] for group in cli.trainer.optimizers[0].param_groups}
    assert groups["lora_B"] == pytest.approx(16 * groups["lora_A"])  # LoRA+ from the config

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lightning_logs" / "smollm2" / "adapter"
    ).eval()
    input_ids = torch.tensor([[5, 9, 12, 7, 3]])
    with torch.no_grad():
        expected = cli.model.model.eval()(input_ids).logits
        actual = peft_model(input_ids).logits
    assert_parity(actual, expected)

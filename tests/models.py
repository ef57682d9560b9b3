"""Small models for the tests: transformers architectures built from configs (no downloads) and plain torch."""

from __future__ import annotations

import copy
import functools
from typing import Callable, Optional

import torch
from torch import nn


def tiny_llama(seed: int = 0, vocab: int = 96, hidden: int = 32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 96, tied: bool = True) -> nn.Module:
    """GPT-2 (HF Conv1D layers); ``tied=False`` gives lm_head its own copy of the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config).eval()
    if not tied and model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    return model


def tiny_bert(seed: int = 0, vocab: int = 96) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


class SmallConvNet(nn.Module):
    """A Conv2d model with padding and stride (optionally dilation, reflect padding and a grouped second conv), and
    a linear head."""

    def __init__(self, dilation: int = 1, padding_mode: str = "zeros", groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=dilation, dilation=dilation, groups=groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def small_convnet(seed: int = 0, dilation: int = 1, padding_mode: str = "zeros", groups: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return SmallConvNet(dilation, padding_mode, groups).eval()


class SequenceAndVolumeConvNet(nn.Module):
    """A Conv1d over the flattened image, then a strided Conv3d over it seen as a volume, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, kernel_size=3, padding=1)
        self.conv3d = nn.Conv3d(8, 16, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 3, 12, 12]
        x = torch.relu(self.conv1d(x.flatten(2)))
        x = torch.relu(self.conv3d(x.reshape(x.shape[0], 8, 4, 6, 6)))
        return self.fc(x.mean(dim=(2, 3, 4)))


def conv1d_conv3d_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SequenceAndVolumeConvNet().eval()


def token_batch(vocab: int = 96, batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def image_batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int = 2, scale: float = 0.1) -> None:
    """Give every adapter tensor random non-zero values, so an adapter visibly changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                if "lora_magnitude" in name:
                    parameter.mul_(1 + scale * noise.to(parameter.dtype))
                else:
                    parameter.copy_(scale * noise)


@functools.cache
def _built(builder: Callable[[], nn.Module]) -> nn.Module:
    return builder()


def fresh(builder: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """A new copy of a test model, ``tiny_llama`` by default (each is built once: building is the slow part)."""
    return copy.deepcopy(_built(builder or tiny_llama))

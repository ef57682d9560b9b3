"""Small models whose linear layers bitsandbytes can quantise on CPU (in_features a multiple of 64)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora.core.layers.adapter_tensors import adapter_parameters


class Chain(nn.Module):
    """``first -> relu -> middle -> relu -> last`` with no residual: every gradient reaching ``first`` (and the
    input) passes back through ``middle``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 128)
        self.middle = nn.Linear(128, 128)
        self.last = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def chain(seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    return Chain()


CHAIN_LAYERS = ("first", "middle", "last")


def bitsandbytes_chain(bits: int) -> nn.Module:
    """The chain built the bitsandbytes way: its layers already are ``Linear4bit`` / ``Linear8bitLt``."""
    import bitsandbytes as bnb

    model = chain()
    for name in CHAIN_LAYERS:
        dense = getattr(model, name)
        if bits == 4:
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
        setattr(model, name, layer.to("cpu"))  # bitsandbytes quantises on .to(device)
    return model


def validation_pass(model: nn.Module) -> None:
    """What Lightning's sanity check and validation loop do: eval mode, no grad, then back to training."""
    model.eval()
    with torch.no_grad():
        model(chain_batch(seed=5))
    model.train()


def chain_batch(seed: int = 1, rows: int = 6) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))


class CheckpointedStack(nn.Module):
    """Embedding, two linear blocks run under reentrant ``torch.utils.checkpoint``, and a head."""

    def __init__(self, checkpointing: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 64)
        self.blocks = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])
        self.head = nn.Linear(64, 96)
        self.checkpointing = checkpointing

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        hidden = self.embed(ids)
        for block in self.blocks:
            if self.checkpointing:
                hidden = checkpoint(lambda h, block=block: torch.relu(block(h)), hidden, use_reentrant=True)
            else:
                hidden = torch.relu(block(hidden))
        return self.head(hidden)


def checkpointed_stack(checkpointing: bool, seed: int = 0) -> CheckpointedStack:
    torch.manual_seed(seed)
    return CheckpointedStack(checkpointing)


def llama64(seed: int = 0) -> nn.Module:
    """A 2-layer Llama with hidden size 64 (the 32-wide default is below bitsandbytes' 4-bit block size)."""
    from models import tiny_llama

    return tiny_llama(seed, hidden=64)


def unpacked_4bit_codes(data: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of bitsandbytes' packed ``uint8`` storage, in the flattened weight's order (high nibble
    first)."""
    flat = data.flatten()
    return torch.stack([flat >> 4, flat & 15], dim=1).flatten().long()


def reference_dequantize_4bit(data: torch.Tensor, state, scales: torch.Tensor, per_row_blocks: bool = False):
    """Dequantise bitsandbytes 4-bit storage in plain torch, independently of its kernels.

    Blocks of ``state.blocksize`` run over the flattened weight, as bitsandbytes quantises them. With
    ``per_row_blocks`` the scales are instead cut per row, as the faulty CPU kernel of bitsandbytes 0.50 on
    AVX512-BF16 machines does (wrong whenever ``in_features`` is not a multiple of the block size).
    """
    rows, columns = state.shape
    values = state.code.float()[unpacked_4bit_codes(data)].view(rows, columns)
    if per_row_blocks:
        per_row = -(-columns // state.blocksize)
        index = torch.arange(rows)[:, None] * per_row + torch.arange(columns)[None, :] // state.blocksize
        index = index.clamp(max=scales.numel() - 1)
    else:
        index = (torch.arange(rows * columns) // state.blocksize).view(rows, columns)
    return values * scales.float()[index]


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Outputs, input gradient and the default adapter's gradients of one training-mode backward of a fixed
    weighted sum of the outputs."""
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {key: p.grad for key, p in adapter_parameters(model, "default")}

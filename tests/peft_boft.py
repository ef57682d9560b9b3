"""PEFT's BOFT as an oracle on any machine.

PEFT 0.21 builds butterfly factors beyond the first only through its CUDA extension ``fbd_cuda`` (compiled at the
first BOFT layer, if nvcc and ninja are there); without it, it warns and silently computes with one factor. The
extension does one thing, block-diagonal matrices ``[N, D*H, D*H]`` from blocks ``[N, D, H, H]`` (and back, for the
gradient), so :func:`use_torch_block_diag_in_peft` gives PEFT that in torch: PEFT then computes every factor count,
on CPU tensors too, and never compiles.
"""

from __future__ import annotations

import torch


class TorchBlockDiag:
    """``fbd_cuda``'s ``forward``/``backward`` in torch (each returns a one-element list, as the extension does)."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad_output: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        factors, count, size, _ = blocks.shape
        diagonal = grad_output.reshape(factors, count, size, count, size).diagonal(dim1=1, dim2=3)
        return [diagonal.permute(0, 3, 1, 2).contiguous()]


def use_torch_block_diag_in_peft() -> None:
    """Make PEFT's BOFT use :class:`TorchBlockDiag` as its extension (a no-op without PEFT)."""
    try:
        from peft.tuners.boft import layer
    except ImportError:
        return
    layer._FBD_CUDA = TorchBlockDiag()

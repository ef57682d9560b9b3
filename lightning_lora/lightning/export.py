r"""
Adapter export
==============

Writes the trained adapter to a folder when training ends, in the PEFT format by default, so a run from the
command line leaves a file that ``peft.PeftModel.from_pretrained`` (or ``lightning_lora.load_adapter``) reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_lora.core.files.adapter_files import FORMATS, save_adapter
from lightning_lora.core.files.peft_export import check_exportable
from lightning_lora.core.layers.adapter_set import adapter_names, get_lora_config
from lightning_lora.lightning.fit_support import check_writable_destination


class AdapterExport(Callback):
    r"""Save the adapter with :func:`~lightning_lora.save_adapter` when ``fit`` finishes training.

    It runs at ``on_train_end``, while the strategy still holds the model (every rank takes part, so tensors sharded
    by FSDP2 are gathered; rank 0 writes). Put it after the ``LoraCallback`` in the callback list.

    Args:
        dirpath: Folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` to.
        format: ``"peft"`` (Hugging Face PEFT), ``"vllm"`` (PEFT restricted to what vLLM serves) or
            ``"lightning_lora"`` (this package's exact format).
        adapter_name: The adapter to save.
        submodule: Attribute path of the module PEFT would wrap (``"model"`` for a LightningModule holding a
            Hugging Face model as ``self.model``); tensor names in the file are relative to it. Default: the whole
            LightningModule. Use the same value as ``LoraCallback(submodule=...)``.

    Raises:
        ValueError: An unknown ``format``; at fit start (before the first step): a ``dirpath`` that cannot be
            written, a ``submodule`` or adapter the model lacks, or an adapter the format cannot hold (vLLM: plain
            LoRA only; trained biases where the kind's PEFT config has none).

    Example::

        trainer = Trainer(callbacks=[
            LoraCallback(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), submodule="model"),
            AdapterExport("adapter", submodule="model"),
        ])
    """

    def __init__(
        self,
        dirpath: Union[str, Path],
        format: Literal["peft", "vllm", "lightning_lora"] = "peft",
        adapter_name: str = "default",
        submodule: Optional[str] = None,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
        self.dirpath = Path(dirpath)
        self.format = format
        self.adapter_name = adapter_name
        self.submodule = submodule

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module whose adapter is saved.

        Raises:
            ValueError: ``pl_module`` has no module at ``submodule``.
        """
        if not self.submodule:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError as error:
            raise ValueError(
                f"{type(pl_module).__name__} has no module {self.submodule!r} to save the adapter of; fix "
                "AdapterExport(submodule=...) to match LoraCallback(submodule=...)."
            ) from error

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        if self.adapter_name not in adapter_names(target):
            raise ValueError(
                f"AdapterExport saves adapter {self.adapter_name!r}, but {type(target).__name__} has "
                f"{adapter_names(target) or 'no adapters'}. Fix AdapterExport(adapter_name=..., submodule=...) to "
                "match the LoraCallback."
            )
        if self.format != "lightning_lora":
            check_exportable(self.adapter_name, get_lora_config(target, self.adapter_name), vllm=self.format == "vllm")
        check_writable_destination(self.dirpath, "AdapterExport(dirpath=...)", trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_adapter(self.target(pl_module), self.dirpath, adapter_name=self.adapter_name, format=self.format)
        rank_zero_info(f"Adapter {self.adapter_name!r} saved in the {self.format} format to {self.dirpath}")

"""``lightning-lora``: the LightningCLI for adapter fine-tuning from YAML files.

Example::

    lightning-lora fit --config configs/quickstart.yaml
    lightning-lora test --config configs/quickstart.yaml --ckpt_path lightning_logs/quickstart/checkpoints/last.ckpt
    python -m lightning_lora fit --config configs/quickstart.yaml --print_config

The adapter is configured like any callback, under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_lora.LoraCallback
          init_args:
            config: {r: 8, alpha: 16, target_modules: [query, value], modules_to_save: [head]}
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

DESCRIPTION = (
    "Fine-tune any LightningModule with LoRA-family adapters. The adapter is the callback "
    "lightning_lora.LoraCallback (or a LightningModule using lightning_lora.LoraMixin); the module builds its "
    "optimizer from `optimizer`/`scheduler` arguments, so adapters are optimised and frozen weights are not."
)


class LoraLightningCLI(LightningCLI):
    """``LightningCLI`` for adapter training.

    It differs from the stock CLI in one way that matters: ``auto_configure_optimizers`` is off. The stock CLI builds
    the optimizer from ``model.parameters()`` before the adapters exist, so it would train the frozen base and
    not the adapters. The LightningModule takes ``optimizer: OptimizerCallable`` (and optionally
    ``scheduler: LRSchedulerCallable``) instead and builds the optimizer over its trainable parameters;
    ``LoraMixin`` does this with LoRA+ parameter groups. The config saved beside the logs is overwritten on a re-run.

    Args:
        args: Command-line arguments (a list, dict or Namespace); default: ``sys.argv[1:]``.
        kwargs: Passed on to ``LightningCLI``.

    Raises:
        ValueError: ``auto_configure_optimizers=True`` was passed.
    """

    def __init__(self, args: Optional[Any] = None, **kwargs: Any) -> None:
        if kwargs.pop("auto_configure_optimizers", False):
            raise ValueError(
                "LoraLightningCLI needs auto_configure_optimizers=False: an optimizer built by the CLI from "
                "model.parameters() would miss the adapters. Give the LightningModule an `optimizer: "
                "OptimizerCallable` argument (or use LoraMixin) instead."
            )
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", DESCRIPTION)
        super().__init__(args=args, auto_configure_optimizers=False, **kwargs)


def main(args: Optional[list[str]] = None, prog: str = "lightning-lora") -> None:
    """Entry point of the ``lightning-lora`` console script and of ``python -m lightning_lora``.

    Args:
        args: Command-line arguments; default: ``sys.argv[1:]``.
        prog: Program name shown in ``--help``.
    """
    LoraLightningCLI(args=args, parser_kwargs={"prog": prog})


if __name__ == "__main__":
    main()

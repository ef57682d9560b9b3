"""``python -m lightning_lora``: the same as the ``lightning-lora`` command."""

from lightning_lora.lightning.cli import main

if __name__ == "__main__":
    main(prog="python -m lightning_lora")

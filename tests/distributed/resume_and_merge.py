"""Two-process runs for tests/test_distributed.py: exact resume from adapter-only checkpoints and merge on fit end.
Lightning re-launches this script for rank 1.

    python resume_and_merge.py {ddp|fsdp2|fsdp1|deepspeed} OUT_DIR

``ddp`` and ``fsdp2`` (ModelParallelStrategy) run on CPU with gloo; ``fsdp1`` (FSDPStrategy) and ``deepspeed`` (each
also on a 4-bit base) need two GPUs. For each resume flavour ``<name>`` it writes ``<name>-uninterrupted.pt``
(adapter after two epochs) and ``<name>-resumed.pt`` (one epoch, checkpoint, a new Trainer and module, one more
epoch), both ``{"adapter": full tensors, "sharded": whether the live adapter tensors were sharded}``, and keeps the
checkpoints under ``<name>-checkpoints/``; ``<name>-refused.txt`` holds the error of resuming it with another rank
(FSDP2). The merge run writes ``merged/model.safetensors`` and ``merge.pt`` (``{"adapter": ..., "merged": whether
the model was left merged}``)."""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import (
    BuiltInInit,
    ShardedBuiltInInit,
    ShardedMixinBuiltOnMeta,
    dataloader,
    exit_cleanly,
    lora_config,
    trainer_arguments,
)

from lightning_lora import LoraCallback, QuantizationConfig, adapter_state_dict
from lightning_lora.core.common.distributed import gather_full_state_dict, global_rank, is_dtensor

EPOCHS = 2  # 4 steps each on each rank
Make = Callable[[], tuple[L.LightningModule, list]]


def fit(
    module: L.LightningModule,
    strategy: Any,
    epochs: int,
    callbacks: list,
    accelerator: str,
    checkpoint_dir: Optional[Path] = None,
    ckpt_path: Optional[Path] = None,
) -> None:
    if checkpoint_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=checkpoint_dir, filename="epoch{epoch}", save_top_k=-1)]
    trainer = L.Trainer(
        **trainer_arguments(
            accelerator=accelerator,
            devices=2,
            strategy=strategy,
            max_epochs=epochs,
            callbacks=callbacks,
            enable_checkpointing=checkpoint_dir is not None,
        )
    )
    trainer.fit(module, dataloader(), ckpt_path=ckpt_path)


def full_adapter(module: L.LightningModule) -> dict[str, Any]:
    """The adapter as full CPU tensors on rank 0 (every rank takes part), and whether it was sharded."""
    gathered = nullcontext()
    if any(hasattr(p, "ds_id") for p in module.parameters()):  # DeepSpeed ZeRO-3 partitions
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gathered:
        state = adapter_state_dict(module)
        sharded = all(is_dtensor(v) for k, v in state.items() if ".lora_" in k)
        return {"adapter": gather_full_state_dict(state), "sharded": sharded}


def save(payload: dict[str, Any], path: Path) -> None:
    if global_rank() == 0:
        torch.save(payload, path)


def uninterrupted_and_resumed(out: Path, name: str, make: Make, strategy: Callable[[], Any], accelerator: str) -> None:
    L.seed_everything(0)
    module, callbacks = make()
    fit(module, strategy(), EPOCHS, callbacks, accelerator)
    save(full_adapter(module), out / f"{name}-uninterrupted.pt")

    L.seed_everything(0)
    module, callbacks = make()
    fit(module, strategy(), 1, callbacks, accelerator, checkpoint_dir=out / f"{name}-checkpoints")
    L.seed_everything(0)
    module, callbacks = make()
    checkpoint = out / f"{name}-checkpoints" / "epochepoch=0.ckpt"
    fit(module, strategy(), EPOCHS, callbacks, accelerator, ckpt_path=checkpoint)
    save(full_adapter(module), out / f"{name}-resumed.pt")


def refuses_another_rank(out: Path, name: str, make: Make, strategy: Callable[[], Any], accelerator: str) -> None:
    """Resuming ``name``'s checkpoint with rank 2 instead of 4 must fail before training; the message is kept."""
    module, callbacks = make()
    checkpoint = out / f"{name}-checkpoints" / "epochepoch=0.ckpt"
    try:
        fit(module, strategy(), EPOCHS, callbacks, accelerator, ckpt_path=checkpoint)
    except ValueError as error:
        message = str(error)
    else:
        message = "resumed without an error"
    if global_rank() == 0:
        (out / f"{name}-refused.txt").write_text(message)


def merge_on_fit_end(out: Path, module_class: type, strategy: Any, accelerator: str) -> None:
    L.seed_everything(0)  # the test rebuilds the same base model from this seed
    module = module_class()
    callback = LoraCallback(lora_config(), submodule="model", merge_on_fit_end=True, merged_weights_dir=out / "merged")
    fit(module, strategy, 1, [callback], accelerator)
    payload = full_adapter(module)
    payload["merged"] = module.model.fc1.merged_adapters == ["default"]
    save(payload, out / "merge.pt")


def with_callback(module_class: type, r: int = 4, **overrides: Any) -> Make:
    return lambda: (module_class(), [LoraCallback(lora_config(r=r, **overrides))])


def mixin_on_meta_device(r: int = 4) -> tuple[L.LightningModule, list]:
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # noqa: E731
    return ShardedMixinBuiltOnMeta(lora_config=lora_config(r=r), optimizer=optimizer), []


def main() -> None:
    kind, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if kind == "ddp":
        merge_on_fit_end(out, BuiltInInit, "ddp", "cpu")
        uninterrupted_and_resumed(out, "ddp", with_callback(BuiltInInit), lambda: "ddp", "cpu")
    elif kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        def fsdp2(distributed_checkpoint: bool = True) -> ModelParallelStrategy:
            return ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed_checkpoint
            )

        merge_on_fit_end(out, ShardedBuiltInInit, fsdp2(), "cpu")
        uninterrupted_and_resumed(out, "fsdp2-sharded", with_callback(ShardedBuiltInInit), fsdp2, "cpu")
        uninterrupted_and_resumed(out, "fsdp2-full", mixin_on_meta_device, lambda: fsdp2(False), "cpu")
        refuses_another_rank(out, "fsdp2-sharded", with_callback(ShardedBuiltInInit, r=2), fsdp2, "cpu")
        refuses_another_rank(out, "fsdp2-full", lambda: mixin_on_meta_device(r=2), lambda: fsdp2(False), "cpu")
    elif kind == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        def fsdp1(state_dict_type: str = "sharded") -> FSDPStrategy:
            return FSDPStrategy(auto_wrap_policy={torch.nn.Linear}, state_dict_type=state_dict_type)

        merge_on_fit_end(out, BuiltInInit, fsdp1(), "cuda")
        uninterrupted_and_resumed(out, "fsdp1-sharded", with_callback(BuiltInInit), fsdp1, "cuda")
        uninterrupted_and_resumed(out, "fsdp1-full", with_callback(BuiltInInit), lambda: fsdp1("full"), "cuda")
        # FSDP-QLoRA through FSDP1: a unit's flat parameter has one dtype, so the 4-bit bytes are stored as float32
        qlora = QuantizationConfig(bits=4, double_quant=True, storage_dtype="float32")
        uninterrupted_and_resumed(out, "fsdp1-qlora", with_callback(BuiltInInit, quantization=qlora), fsdp1, "cuda")
    elif kind == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        merge_on_fit_end(out, BuiltInInit, DeepSpeedStrategy(stage=2), "cuda")
        for stage in (2, 3):
            strategy = functools.partial(DeepSpeedStrategy, stage=stage)
            uninterrupted_and_resumed(out, f"deepspeed{stage}", with_callback(BuiltInInit), strategy, "cuda")
        qlora = QuantizationConfig(bits=4, double_quant=True, storage_dtype="float32")  # ZeRO-3 flattens too
        zero3 = functools.partial(DeepSpeedStrategy, stage=3)
        on_4bit_base = with_callback(BuiltInInit, quantization=qlora)
        uninterrupted_and_resumed(out, "deepspeed3-qlora", on_4bit_base, zero3, "cuda")
    else:
        raise ValueError(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main()
    exit_cleanly()

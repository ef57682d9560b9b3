"""FSDP-QLoRA in one process (a one-rank FSDP2 mesh: gloo on CPU, NCCL on CUDA where there is one, so every sharded
code path runs): reading, merging into and exporting a 4-bit base whose packed weights FSDP2 holds as DTensors, and
the refusal of sharded 8-bit layers. Two-process training, resume and export run in tests/test_kinds_distributed.py."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterator

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("bitsandbytes")

from lightning_models import ShardedBuiltInInit, dataloader, lora_config, trainer_arguments  # noqa: E402
from models import randomize_adapters  # noqa: E402
from numerics import RELATIVE_TOLERANCE, assert_parity  # noqa: E402
from quantized_models import chain, chain_batch  # noqa: E402

from lightning_lora import (  # noqa: E402
    LoraCallback,
    LoraConfig,
    QuantizationConfig,
    apply_lora,
    dequantize_model,
    load_merged_state_dict,
    merge_lora,
    quantized_layers,
    save_merged_model,
)
from lightning_lora.core.common.base_weights import dense_weight  # noqa: E402
from lightning_lora.core.common.distributed import is_dtensor  # noqa: E402

NF4 = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, layers="all-linear")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """The device, inside a one-rank process group for it."""
    backend = "nccl" if request.param == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


def exact(device: str) -> dict:
    """Sharded and unsharded runs compute the same numbers: bitwise on CPU, to rounding on CUDA."""
    return {"rtol": 0, "atol": 0} if device == "cpu" else {}


def qlora_chain(device: str, storage_dtype: str = "uint8") -> nn.Module:
    """The 64-128-128-64 chain, every layer 4-bit, adapters on ``first`` and ``last`` (``middle`` has none)."""
    model = chain().to(device)
    torch.manual_seed(10)
    quantization = dataclasses.replace(NF4, storage_dtype=storage_dtype)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["first", "last"], quantization=quantization))
    randomize_adapters(model)
    return model


def sharded(model: nn.Module, device: str, **fully_shard_arguments: Any) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (1,))
    for layer in (model.first, model.middle, model.last):
        fully_shard(layer, mesh=mesh, **fully_shard_arguments)
    return fully_shard(model, mesh=mesh, **fully_shard_arguments)


def test_a_sharded_4bit_layer_reads_as_its_dequantised_weight_and_computes_the_same(device: str) -> None:
    plain = qlora_chain(device)
    model = sharded(copy.deepcopy(plain), device)
    assert is_dtensor(model.middle.weight) and model.middle.weight.dtype == torch.uint8
    assert [name for name, _ in quantized_layers(model)] == ["first", "middle", "last"]
    for name in ("first", "middle", "last"):
        weight = dense_weight(getattr(model, name))
        assert is_dtensor(weight)  # sharded by rows, like a full-precision FSDP2 weight
        assert torch.equal(weight.full_tensor(), dense_weight(getattr(plain, name)))
    x = chain_batch().to(device)
    torch.testing.assert_close(model(x), plain(x), **exact(device))


def test_merging_into_a_sharded_4bit_base_requantizes_like_an_unsharded_one(device: str) -> None:
    plain = qlora_chain(device)
    model = sharded(copy.deepcopy(plain), device)
    with pytest.warns(UserWarning, match="re-quantises"):
        merge_lora(plain)
    with pytest.warns(UserWarning, match="re-quantises"):
        merge_lora(model)
    for name in ("first", "last"):
        layer, reference = getattr(model, name), getattr(plain, name)
        assert torch.equal(layer.weight.full_tensor(), reference.weight.data)
        assert torch.equal(layer.quant_state.absmax, reference.weight.quant_state.absmax)
    x = chain_batch().to(device)
    torch.testing.assert_close(model(x), plain(x), **exact(device))


def test_save_merged_model_dequantizes_a_sharded_4bit_base_into_full_precision_files(device: str, tmp_path) -> None:
    plain = qlora_chain(device)
    model = sharded(copy.deepcopy(plain), device)
    x = chain_batch()
    with torch.no_grad():
        expected = plain(x.to(device)).cpu()
    with pytest.raises(ValueError, match="dequantize=True"):
        save_merged_model(model, tmp_path / "refused")
    with pytest.raises(ValueError, match=r"sharded by FSDP2.*save_merged_model\(model, directory, dequantize=True\)"):
        dequantize_model(model)
    assert len(quantized_layers(model)) == 3  # unchanged
    written = load_merged_state_dict(save_merged_model(model, tmp_path / "merged", dequantize=True))
    exported = chain()
    exported.load_state_dict(written)  # strict: plain nn.Linear keys, no quantisation state
    with torch.no_grad():
        assert_parity(exported(x), expected)


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_4bit_weights_stored_as_floats_are_the_same_bytes_and_compute_the_same(storage_dtype: str) -> None:
    packed_bytes, stored_as_floats = qlora_chain("cpu"), qlora_chain("cpu", storage_dtype)
    for name in ("first", "middle", "last"):
        weight = getattr(stored_as_floats, name).weight
        assert weight.dtype == getattr(torch, storage_dtype)
        assert torch.equal(weight.data.view(torch.uint8).flatten(), getattr(packed_bytes, name).weight.data.flatten())
        assert torch.equal(dense_weight(getattr(stored_as_floats, name)), dense_weight(getattr(packed_bytes, name)))
    x = chain_batch()
    torch.testing.assert_close(stored_as_floats(x), packed_bytes(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        QuantizationConfig(storage_dtype="int4")


def test_a_mixed_precision_policy_may_shard_uint8_storage_but_not_cast_float_storage(device: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    x = chain_batch().to(device)
    reference = qlora_chain(device)
    with torch.no_grad():
        expected = reference(x)
    cast = sharded(qlora_chain(device, "float32"), device, mp_policy=policy)
    with pytest.raises(ValueError, match=r"cast it.*storage_dtype='uint8'"):
        cast(x)
    packed = sharded(qlora_chain(device), device, mp_policy=policy)  # FSDP2 casts floating parameters only
    with torch.no_grad():
        assert_parity(packed(x).float(), expected, rel=RELATIVE_TOLERANCE[torch.bfloat16])  # bf16 adapters and inputs


def test_lora_callback_refuses_an_8bit_base_that_fsdp2_sharded() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    config = lora_config(quantization=QuantizationConfig(bits=8))
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = L.Trainer(**trainer_arguments(strategy=strategy, max_steps=1, callbacks=[LoraCallback(config)]))
    with pytest.raises(ValueError, match=r"8-bit layers sharded by FSDP2.*bits=4"):
        trainer.fit(ShardedBuiltInInit(), dataloader())

"""QLoRA on bitsandbytes' CUDA kernels (skipped without CUDA; run by benchmarks/gpu_checks.sh): a 4-bit base on
the GPU computes and back-propagates like its dequantised weights, its adapter files load into a full-precision CPU
model, and its merged export is the dequantised merged model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("bitsandbytes")

from models import randomize_adapters  # noqa: E402
from quantized_models import chain, chain_batch, outputs_and_grads  # noqa: E402

from lightning_lora import (  # noqa: E402
    LoraConfig,
    QuantizationConfig,
    apply_lora,
    delete_adapter,
    dequantize_model,
    load_adapter,
    load_merged_state_dict,
    quantized_layers,
    save_adapter,
    save_merged_model,
)

# (quantisation, tolerance): bf16 compute rounds the activations
OPTIONS = {
    "nf4": (QuantizationConfig(bits=4, quant_type="nf4", layers="all-linear"), 1e-4),
    "fp4-double": (QuantizationConfig(bits=4, quant_type="fp4", double_quant=True, layers="all-linear"), 1e-4),
    "nf4-bf16-compute": (QuantizationConfig(bits=4, compute_dtype="bfloat16", layers="all-linear"), 5e-2),
}


def qlora_chain_on_gpu(quantization: QuantizationConfig, use_dora: bool = False) -> nn.Module:
    model = chain().cuda()
    torch.manual_seed(10)
    config = LoraConfig(r=4, alpha=8, target_modules=["first", "last"], use_dora=use_dora, quantization=quantization)
    apply_lora(model, config)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("option", OPTIONS)
def test_a_4bit_base_on_cuda_computes_like_its_dequantised_weights(option: str, use_dora: bool) -> None:
    quantization, tolerance = OPTIONS[option]
    quantized = qlora_chain_on_gpu(quantization, use_dora)
    assert len(quantized_layers(quantized)) == 3 and quantized.first.weight.device.type == "cuda"
    reference = dequantize_model(copy.deepcopy(quantized))
    x = chain_batch().cuda()
    out, grad_x, grads = outputs_and_grads(quantized, x)
    ref_out, ref_grad_x, ref_grads = outputs_and_grads(reference, x)
    torch.testing.assert_close(out, ref_out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=tolerance, rtol=tolerance)
    for key, grad in ref_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=tolerance, rtol=tolerance, msg=key)


def test_adapter_files_and_merged_export_of_a_cuda_qlora_model_load_on_a_full_precision_cpu_model(tmp_path) -> None:
    quantization, tolerance = OPTIONS["nf4"]
    model = qlora_chain_on_gpu(quantization)
    x = chain_batch()
    with torch.no_grad():
        expected = model(x.cuda()).cpu()
    save_adapter(model, tmp_path / "adapter")
    base = dequantize_model(copy.deepcopy(model)).cpu()  # the dequantised base the adapter was trained on
    delete_adapter(base, "default")
    load_adapter(base, tmp_path / "adapter")
    exported = chain()
    exported.load_state_dict(load_merged_state_dict(save_merged_model(model, tmp_path / "merged", dequantize=True)))
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(exported(x), expected, atol=tolerance, rtol=tolerance)

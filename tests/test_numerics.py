"""Low precision and torch.compile."""

from __future__ import annotations


import pytest
import torch

from lightning_lora import LoraConfig, apply_lora
from models import randomize_adapters, tiny_llama, token_batch
from numerics import assert_parity


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_model_gives_finite_outputs_and_gradients(use_dora: bool) -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, use_dora=use_dora)).to(torch.bfloat16)
    randomize_adapters(model)
    tokens = token_batch()
    out = model(tokens, labels=tokens)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_fp32_adapters_on_a_bf16_base_keep_the_output_dtype() -> None:
    model = tiny_llama().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].dtype == torch.float32
    tokens = token_batch()
    out = model(tokens, labels=tokens)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.lora_B["default"].grad.dtype == torch.float32


def test_compiled_model_matches_eager_for_lora_and_dora() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    apply_lora(model, LoraConfig(r=4, target_modules=["0", "2"], dropout=0.1), "plain")
    apply_lora(model, LoraConfig(r=2, target_modules=["2"], use_dora=True), "dora")
    randomize_adapters(model)
    model.eval()  # dropout off, so both runs compute the same thing
    x = torch.randn(5, 16)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(x)
    assert_parity(out, eager)
    out.square().sum().backward()
    for key, grad in eager_grads.items():
        assert_parity(dict(model.named_parameters())[key].grad, grad, msg=key)

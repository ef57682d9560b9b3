"""Forward, backward and merge numerics match HF PEFT for the same adapter weights.

Both sides run in float64, so the parity bound (1e-10 of the largest magnitude, ``numerics.assert_parity``) holds
whatever order the CPU sums in, and is still far below any real bug.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_lora import LoraConfig, apply_lora, merge_and_unload
from models import conv1d_conv3d_net, image_batch, randomize_adapters, small_convnet, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity
from peft_oracle import copy_adapter_into_peft, peft_adapter_grads, peft_twin

pytest.importorskip("peft")

MODELS = {
    # name: (builder, targets, input kind)
    "llama": (tiny_llama, "all-linear", "embeds"),
    "gpt2": (lambda: tiny_gpt2(tied=False), ["c_attn", "c_proj", "c_fc", "wte"], "tokens"),
    "bert": (tiny_bert, ["query", "value", "dense", "word_embeddings"], "tokens"),
    "convnet": (small_convnet, ["conv1", "conv2", "fc"], "image"),
    "conv1d-conv3d": (conv1d_conv3d_net, ["conv1d", "conv3d"], "image"),
}
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "patterns": {"rank_pattern": {"layers.0.*": 2, "h.1.*": 2, "conv2": 3, "conv3d": 3}, "alpha_pattern": {".*fc": 3.0}},
}


def _inputs(kind: str, model: torch.nn.Module) -> dict:
    if kind == "image":
        return {"x": image_batch().double().requires_grad_(True)}
    tokens = token_batch()
    if kind == "tokens":
        return {"input_ids": tokens}
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    return {"inputs_embeds": embeds}


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    inputs = {k: (v.detach().clone().requires_grad_(v.requires_grad)) for k, v in inputs.items()}
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    weights = torch.linspace(-1.0, 1.0, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    (logits * weights).mean().backward()
    grad_input = next((v.grad for v in inputs.values() if v.requires_grad), None)
    return logits.detach(), grad_input


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_forward_backward_and_merge_match_peft(model_name: str, variant: str) -> None:
    builder, targets, input_kind = MODELS[model_name]
    base = builder().double()
    config = LoraConfig(r=4, alpha=8, target_modules=targets, **VARIANTS[variant])
    ours = apply_lora(copy.deepcopy(base), config).double()
    theirs = peft_twin(base, config).double()
    randomize_adapters(ours)
    copy_adapter_into_peft(ours, theirs)
    inputs = _inputs(input_kind, base)

    our_logits, our_grad_input = _run(ours, inputs)
    their_logits, their_grad_input = _run(theirs, inputs)
    assert our_logits.dtype == their_logits.dtype == torch.float64
    assert_parity(our_logits, their_logits, msg="logits")
    if our_grad_input is not None:
        assert_parity(our_grad_input, their_grad_input, msg="input gradient")

    our_grads = {k: p.grad for k, p in ours.named_parameters() if ".lora_" in k}
    assert our_grads and all(g is not None for g in our_grads.values())
    their_grads = peft_adapter_grads(theirs, list(our_grads))
    for key, grad in our_grads.items():
        assert_parity(grad, their_grads[key].reshape(grad.shape), msg=key)

    our_merged = merge_and_unload(ours).state_dict()
    their_merged = theirs.merge_and_unload().state_dict()
    assert our_merged.keys() == their_merged.keys()
    for key in our_merged:
        assert_parity(our_merged[key], their_merged[key], msg=key)

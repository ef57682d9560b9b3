"""LoRA on ``nn.MultiheadAttention``, which computes with ``in_proj_weight`` and ``out_proj.weight`` directly: naming
the module adapts both weights (PEFT's layout and files). The update is the exact ``W + dW``; PEFT 0.21 adds
``out_proj``'s update twice (huggingface/peft#3774), which a test shows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    LoHaConfig,
    LoraConfig,
    apply_lora,
    load_adapter,
    load_merged_state_dict,
    merge_lora,
    save_adapter,
    save_merged_model,
    unmerge_lora,
)

peft = pytest.importorskip("peft")


class AttentionNet(nn.Module):
    def __init__(self, kdim: int = 16) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def attention_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AttentionNet().eval()


CONFIG = LoraConfig(r=2, alpha=4, target_modules=["attn"])
X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def _ours(zero_out_proj: bool = False) -> nn.Module:
    model = apply_lora(attention_net(), CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        if zero_out_proj:
            model.attn.lora_parameters.out_proj_weight.lora_B["default"].zero_()
    return model


def _factors(model: nn.Module, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = getattr(model.attn.lora_parameters, site)
    return layer.lora_A["default"], layer.lora_B["default"]


def _reference(model: nn.Module, out_proj_times: float = 1.0) -> nn.Module:
    """A plain attention net with ``W + scaling * B A`` written into both weights."""
    reference = attention_net()
    with torch.no_grad():
        A, B = _factors(model, "in_proj_weight")
        reference.attn.in_proj_weight += 2.0 * B @ A
        A, B = _factors(model, "out_proj_weight")
        reference.attn.out_proj.weight += out_proj_times * 2.0 * B @ A
    return reference


def test_both_weights_get_the_exact_update_and_gradients() -> None:
    model = _ours()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"attn.lora_parameters.{site}.lora_{f}.default" for site in ("in_proj_weight", "out_proj_weight") for f in "AB"
    }
    got = model(X)
    assert_parity(got, _reference(model)(X))
    got.square().sum().backward()
    A, B = (t.detach().clone().requires_grad_() for t in _factors(model, "in_proj_weight"))
    plain = attention_net()
    weight = plain.attn.in_proj_weight.detach() + 2.0 * B @ A
    out_A, out_B = _factors(model, "out_proj_weight")
    out_weight = plain.attn.out_proj.weight.detach() + 2.0 * out_B.detach() @ out_A.detach()
    attended, _ = nn.functional.multi_head_attention_forward(
        X.transpose(0, 1), X.transpose(0, 1), X.transpose(0, 1), 16, 2, weight, plain.attn.in_proj_bias, None, None,
        False, 0.0, out_weight, plain.attn.out_proj.bias, training=False, need_weights=False,
    )
    plain.head(attended.transpose(0, 1)).square().sum().backward()
    assert_parity(_factors(model, "in_proj_weight")[0].grad, A.grad)
    assert_parity(_factors(model, "in_proj_weight")[1].grad, B.grad)


def test_files_go_both_ways_with_peft_and_its_in_proj_numbers_match(tmp_path: Path) -> None:
    ours = _ours(zero_out_proj=True)  # PEFT 0.21 doubles out_proj's update; in_proj alone is comparable
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(attention_net(), tmp_path / "ours")
    with torch.no_grad():
        assert_parity(theirs(X), ours(X))
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        assert_parity(load_adapter(attention_net(), tmp_path / "peft")(X), ours(X))


def test_peft_0_21_adds_the_out_proj_update_twice(tmp_path: Path) -> None:
    ours = _ours()
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(attention_net(), tmp_path)
    with torch.no_grad():
        assert (theirs(X) - ours(X)).abs().max() > 1e-3
        assert_parity(theirs(X), _reference(ours, out_proj_times=2.0)(X))


def test_merge_unmerge_and_the_merged_export(tmp_path: Path) -> None:
    model = _ours()
    with torch.no_grad():
        expected = model(X)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert_parity(merge_lora(model)(X), expected)
        unmerge_lora(model)
        for key, value in model.state_dict().items():
            assert_parity(value, weights[key])
        save_merged_model(model, tmp_path)
        fresh = attention_net(seed=3)
        fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
        assert_parity(fresh(X), expected)


@pytest.mark.parametrize(
    ("build", "config", "message"),
    [
        (attention_net, LoraConfig(target_modules=["attn"], use_dora=True), r"drop \['use_dora'\]"),
        (attention_net, LoHaConfig(target_modules=["attn"]), r"drop \['a kind other than LoRA'\]"),
        (lambda: AttentionNet(kdim=8), CONFIG, r"separate q/k/v weights"),
    ],
)
def test_what_attention_cannot_take_is_refused_by_name(build, config, message: str) -> None:
    model = build()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    assert type(model.attn) is nn.MultiheadAttention

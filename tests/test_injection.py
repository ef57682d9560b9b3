"""apply_lora: what gets adapted, what trains, and what the model looks like afterwards."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoraConfig,
    LoraLayer,
    adapter_state_dict,
    apply_lora,
    initialize_pending_adapters,
    lora_layers,
    trainable_parameters_summary,
)
from models import image_batch, small_convnet, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "orthogonal"])
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize(
    "builder, targets, inputs",
    [
        (tiny_llama, "all-linear", token_batch),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"], token_batch),
        (tiny_bert, ["query", "key", "value", "word_embeddings"], token_batch),
        (small_convnet, ["conv1", "conv2", "fc"], image_batch),
    ],
    ids=["llama", "gpt2", "bert", "convnet"],
)
def test_outputs_at_init_equal_the_base_model(builder, targets, inputs, init: str, use_dora: bool) -> None:
    base = builder()
    x = inputs()
    expected = _logits(base, x)
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, init=init, use_dora=use_dora))
    assert lora_layers(model)
    assert_parity(_logits(model, x), expected)


def test_injection_keeps_base_state_dict_keys_and_adds_adapter_keys() -> None:
    base = tiny_llama()
    base_keys = set(base.state_dict())
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    added = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict())
    assert added == set(adapter_state_dict(model))
    assert "model.layers.0.self_attn.q_proj.lora_A.default" in added
    assert "model.layers.1.self_attn.v_proj.lora_magnitude.default" in added


def test_base_checkpoint_loads_into_injected_model_with_only_adapter_keys_missing() -> None:
    base = tiny_llama(seed=3)
    model = apply_lora(tiny_llama(seed=4), LoraConfig(r=4))
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(adapter_state_dict(model))
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_only_adapters_train_and_the_base_stays_bit_identical() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters_before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = token_batch()
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    changed = [k for k, v in adapters_before.items() if not torch.equal(after[k], v)]
    assert set(changed) == set(adapters_before)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_all_linear_adapts_every_linear_layer_but_the_output_head() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    adapted = {name for name, _ in lora_layers(model)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert adapted == linears - {"lm_head"}


def test_all_linear_includes_hf_conv1d_and_skips_a_classification_head() -> None:
    gpt2 = apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules="all-linear"))
    assert {n.split(".")[-1] for n, _ in lora_layers(gpt2)} == {"c_attn", "c_proj", "c_fc"}
    bert = apply_lora(tiny_bert(), LoraConfig(r=2, target_modules="all-linear"))
    assert "classifier" not in {n for n, _ in lora_layers(bert)}


class _AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(x, x, x, need_weights=False)[0])


def test_all_linear_skips_the_multihead_attention_projection_its_owner_bypasses() -> None:
    model = apply_lora(_AttentionBlock(), LoraConfig(r=2, target_modules="all-linear", init="gaussian"))
    assert {n for n, _ in lora_layers(model)} == {"mlp"}


def test_naming_a_multihead_attention_projection_is_refused_with_the_reason() -> None:
    model = _AttentionBlock()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\['attention.out_proj'\].*never calls out_proj's forward"):
        apply_lora(model, LoraConfig(r=2, target_modules=["out_proj", "mlp"]))
    assert not lora_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_regex_target_exclusions_and_layer_selection() -> None:
    config = LoraConfig(
        r=2,
        target_modules=r".*self_attn\.(q|k|v)_proj",
        exclude_modules=["k_proj"],
        layers_to_transform=[1],
    )
    model = apply_lora(tiny_llama(), config)
    assert {n for n, _ in lora_layers(model)} == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    }


def test_rank_and_alpha_patterns_set_per_layer_rank_and_scaling() -> None:
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 1.0}, use_rslora=True)
    model = apply_lora(tiny_llama(), config)
    layers = dict(lora_layers(model))
    v = layers["model.layers.1.self_attn.v_proj"]
    q0 = layers["model.layers.0.self_attn.q_proj"]
    q1 = layers["model.layers.1.self_attn.q_proj"]
    assert v.lora_A["default"].shape == (2, 32) and q1.lora_A["default"].shape == (4, 32)
    assert q0.scaling("default") == pytest.approx(1.0 / 2.0) and q1.scaling("default") == pytest.approx(4.0)
    assert v.scaling("default") == pytest.approx(8 / 2**0.5)


def test_modules_to_save_train_in_full_and_are_saved_with_the_adapter() -> None:
    model = apply_lora(tiny_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert all(p.requires_grad for p in model.classifier.parameters())
    state = adapter_state_dict(model)
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    assert not isinstance(model.classifier, LoraLayer)


@pytest.mark.parametrize("bias, expected", [("none", set()), ("lora_only", {"query"}), ("all", None)])
def test_bias_option_chooses_which_biases_train(bias: str, expected) -> None:
    model = apply_lora(tiny_bert(), LoraConfig(r=2, target_modules=["query"], bias=bias))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    if expected is None:
        assert trained == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    else:
        assert {n.split(".")[-2] for n in trained} == expected
    assert trained == {k for k in adapter_state_dict(model) if k.endswith(".bias")}


def test_summary_counts_trainable_and_adapter_parameters() -> None:
    model = tiny_llama()
    base_total = trainable_parameters_summary(model).total
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    summary = trainable_parameters_summary(model)
    # q_proj is 32 -> 32 in two layers: A [4, 32] + B [32, 4] each.
    adapter = 2 * (4 * 32 + 32 * 4)
    assert summary.per_adapter == {"default": adapter}
    assert summary.trainable == adapter and summary.total == base_total + adapter
    assert summary.percent == pytest.approx(100 * adapter / (base_total + adapter))
    assert f"trainable%: {summary.percent:.4f}" in str(summary)


def test_conv_adapters_follow_dilation_and_padding_mode() -> None:
    model = small_convnet(dilation=2, padding_mode="reflect")
    x = image_batch()
    apply_lora(model, LoraConfig(r=3, target_modules=["conv1", "conv2"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_()
    adapted = model(x)
    from lightning_lora import merge_and_unload

    merged = merge_and_unload(model)
    assert type(merged.conv2) is nn.Conv2d
    assert_parity(merged(x), adapted)


def test_lora_model_deepcopies_and_pickles() -> None:
    model = apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "wte"]))
    tokens = token_batch()
    expected = model(tokens).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.transformer.h[0].attn.c_attn).__name__ == "LoraConv1D"
        assert_parity(clone(tokens).logits, expected)


def test_injection_on_meta_device_defers_init_until_weights_exist() -> None:
    with torch.device("meta"):
        model = tiny_llama()
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].is_meta and not layer.lora_settings["default"].initialized
    model.to_empty(device="cpu")
    model.load_state_dict(tiny_llama().state_dict(), strict=False)
    assert initialize_pending_adapters(model) == 2
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    assert_parity(layer.lora_magnitude["default"], torch.linalg.vector_norm(layer.weight, dim=1))
    x = torch.randn(3, 32)
    assert_parity(layer(x), x @ layer.weight.t())


def test_dropout_applies_in_training_only() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], dropout=0.5))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_()
    tokens = token_batch()
    model.eval()
    assert torch.equal(model(tokens).logits, model(tokens).logits)
    model.train()
    assert not torch.equal(model(tokens).logits, model(tokens).logits)


def test_dora_embedding_with_dropout_trains() -> None:
    model = apply_lora(tiny_bert(), LoraConfig(r=2, target_modules=["word_embeddings", "query"], dropout=0.2,
                                               use_dora=True)).train()
    layer = model.bert.embeddings.word_embeddings
    assert layer.lora_settings["default"].dropout == 0.0  # token indices take no dropout
    tokens = token_batch()
    model(tokens).logits.sum().backward()
    assert layer.lora_B["default"].grad is not None

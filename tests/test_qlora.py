"""QLoRA: a bitsandbytes-quantised frozen base under full-precision adapters (plain PyTorch, CPU)."""

from __future__ import annotations

import dataclasses
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from models import randomize_adapters, token_batch  # noqa: E402
from numerics import RELATIVE_TOLERANCE, assert_parity  # noqa: E402
from quantized_models import (  # noqa: E402
    CHAIN_LAYERS,
    bitsandbytes_chain,
    chain,
    chain_batch,
    checkpointed_stack,
    llama64,
    outputs_and_grads,
    reference_dequantize_4bit,
    validation_pass,
)

from lightning_lora import (  # noqa: E402
    LoraConfig,
    QuantizationConfig,
    adapter_state_dict,
    apply_lora,
    dequantize_model,
    disable_adapters,
    load_adapter,
    load_adapter_state_dict,
    load_merged_state_dict,
    lora_layers,
    lora_param_groups,
    merge_and_unload,
    merge_lora,
    prepare_for_kbit_training,
    quantized_layers,
    read_adapter_config,
    save_adapter,
    save_merged_model,
)
from lightning_lora.core.common.base_weights import dense_weight  # noqa: E402
from lightning_lora.core.layers.adapter_tensors import adapter_parameters  # noqa: E402
from lightning_lora.core.quantization import quantize as quantization
from lightning_lora.core.quantization import quantized_weights  # noqa: E402

OPTIONS = {
    "nf4": QuantizationConfig(bits=4, quant_type="nf4", layers="all-linear"),
    "fp4-double": QuantizationConfig(bits=4, quant_type="fp4", double_quant=True, layers="all-linear"),
    "int8": QuantizationConfig(bits=8, layers="all-linear"),
}


def qlora_chain(quantization: QuantizationConfig, **config) -> nn.Module:
    """The chain with adapters on ``first`` and ``last``; ``middle`` is quantised without an adapter."""
    model = chain()
    torch.manual_seed(10)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["first", "last"], quantization=quantization, **config))
    randomize_adapters(model)
    return model


def adapter_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(x).square().mean().backward()
    return {key: p.grad.clone() for key, p in adapter_parameters(model, "default")}


def test_targeted_layers_are_quantized_in_place_and_stay_close_to_their_weights() -> None:
    original = chain()
    model = chain()
    modules = {name: getattr(model, name) for name in CHAIN_LAYERS}
    apply_lora(model, LoraConfig(r=4, target_modules=["first", "last"], quantization=QuantizationConfig()))
    assert isinstance(model.first, bnb.nn.Linear4bit) and isinstance(model.last, bnb.nn.Linear4bit)
    assert model.first is modules["first"] and model.last is modules["last"]
    assert type(model.middle) is nn.Linear  # layers="targets": only the adapted layers
    for name in ("first", "last"):
        weight = getattr(original, name).weight
        error = (dense_weight(getattr(model, name)) - weight).norm() / weight.norm()
        assert error < 0.15, name  # NF4's own rounding is about 0.09; scrambled blocks give 0.3 and more
        assert torch.equal(getattr(model, name).bias, getattr(original, name).bias)


def test_all_linear_quantization_leaves_modules_to_save_and_other_kinds_in_full_precision() -> None:
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 64))
    config = LoraConfig(
        r=4, target_modules=["0", "1"], modules_to_save=["3"], quantization=QuantizationConfig(layers="all-linear")
    )
    apply_lora(model, config)
    assert [name for name, _ in quantized_layers(model)] == ["1", "2"]  # adapted "1" and adapter-free "2"
    assert type(model[3]) is nn.Linear and model[3].weight.requires_grad
    assert model[0].weight.dtype == torch.float32 and lora_layers(model)[0][0] == "0"


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_dora_on_a_quantized_base_starts_from_the_quantized_base_outputs(kind: str) -> None:
    model = chain()
    torch.manual_seed(10)
    apply_lora(model, LoraConfig(r=4, target_modules=["first", "last"], use_dora=True, quantization=OPTIONS[kind]))
    model.train()  # the math adapters train with (bitsandbytes' int8 eval path also quantises inputs)
    x = chain_batch()
    with torch.no_grad():
        adapted = model(x)
        with disable_adapters(model):
            base = model(x)
    assert_parity(adapted, base)  # magnitudes are the quantised weights' norms


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", list(OPTIONS))
def test_forward_and_backward_match_dequantized_weight_math(kind: str, use_dora: bool) -> None:
    quantized = qlora_chain(OPTIONS[kind], use_dora=use_dora)
    reference = dequantize_model(qlora_chain(OPTIONS[kind], use_dora=use_dora))
    assert len(quantized_layers(quantized)) == 3 and not quantized_layers(reference)
    x = chain_batch()
    out, grad_x, grads = outputs_and_grads(quantized, x)
    ref_out, ref_grad_x, ref_grads = outputs_and_grads(reference, x)
    assert_parity(out, ref_out)
    assert_parity(grad_x, ref_grad_x)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        assert grad.dtype == torch.float32, key
        assert_parity(grad, ref_grads[key], msg=key)


def test_bfloat16_compute_dtype_keeps_float32_inputs_outputs_and_adapters() -> None:
    options = QuantizationConfig(compute_dtype="bfloat16", layers="all-linear")
    quantized = qlora_chain(options)
    reference = dequantize_model(qlora_chain(options))
    out, _, grads = outputs_and_grads(quantized, chain_batch())
    ref_out, _, _ = outputs_and_grads(reference, chain_batch())
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    assert_parity(out, ref_out, rel=RELATIVE_TOLERANCE[torch.bfloat16])  # bfloat16 matmuls in the base


def test_plain_bitsandbytes_4bit_layer_loses_the_input_gradient_after_an_eval_forward() -> None:
    """The trap this package avoids, shown on bitsandbytes alone (why the next tests exist)."""
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(chain_batch())
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes / CPU does not repack 4-bit weights for inference")
    layer.train()
    x = chain_batch().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "an autograd kernel was not registered ..."
        layer(x).sum().backward()
    assert x.grad is None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_gradients_after_a_validation_pass_equal_those_of_a_never_evaluated_model(kind: str) -> None:
    evaluated, fresh = qlora_chain(OPTIONS[kind]), qlora_chain(OPTIONS[kind])
    validation_pass(evaluated)
    x = chain_batch()
    grads_evaluated, grads_fresh = adapter_grads(evaluated, x), adapter_grads(fresh, x)
    # first's adapter is reached only through the quantised middle layer (no residual path).
    assert grads_fresh["first.lora_A.default"].abs().sum() > 0
    for key, grad in grads_fresh.items():
        torch.testing.assert_close(grads_evaluated[key], grad, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bitsandbytes_model_evaluated_before_injection_trains_correctly(bits: int) -> None:
    model = bitsandbytes_chain(bits)
    validation_pass(model)  # bitsandbytes repacks its 4-bit weights for CPU inference here
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["first", "last"]))
    assert all(isinstance(m, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt) for _, m in lora_layers(model))
    randomize_adapters(model)
    validation_pass(model)
    x = chain_batch()
    out, grad_x, grads = outputs_and_grads(model, x)
    model.zero_grad()
    ref_out, ref_grad_x, ref_grads = outputs_and_grads(dequantize_model(model), x)
    assert_parity(out, ref_out)
    assert_parity(grad_x, ref_grad_x)
    for key, grad in grads.items():
        assert_parity(grad, ref_grads[key], msg=key)


def test_training_a_4bit_llama_lowers_the_loss_and_leaves_the_quantized_base_untouched() -> None:
    model = llama64()
    apply_lora(model, LoraConfig(r=8, alpha=16, quantization=OPTIONS["nf4"]))
    assert len(quantized_layers(model)) == 14  # 7 linear layers per block; lm_head stays full precision
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = token_batch(length=12)
    losses = []
    model.train()
    for step in range(12):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 4 == 0:
            model.eval()
            with torch.no_grad():
                model(input_ids=tokens)
            model.train()
    assert losses[-1] < 0.8 * losses[0]
    after = model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in base.items())


def test_merging_into_a_4bit_base_dequantizes_adds_and_requantizes_with_a_warning() -> None:
    model = qlora_chain(OPTIONS["nf4"])
    expected = {
        name: quantized_weights.fake_quantize(dense_weight(layer) + layer.delta_weight("default"), OPTIONS["nf4"])
        for name, layer in lora_layers(model)
    }
    with pytest.warns(UserWarning, match="re-quantises"):
        merge_lora(model)
    for name, layer in lora_layers(model):
        assert isinstance(layer.weight, bnb.nn.Params4bit), name
        assert torch.equal(dense_weight(layer), expected[name]), name


def test_merge_and_unload_on_a_4bit_base_returns_bitsandbytes_layers() -> None:
    model = qlora_chain(OPTIONS["nf4"])
    x = chain_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merge_lora(model)
        with torch.no_grad():
            merged = model(x)
        merge_and_unload(model)
    assert not lora_layers(model)
    assert all(type(getattr(model, name)) is bnb.nn.Linear4bit for name in CHAIN_LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantize_then_merge_and_unload_exports_a_full_precision_model_with_the_same_outputs(kind: str) -> None:
    model = qlora_chain(OPTIONS[kind])
    x = chain_batch()
    model.train()  # bitsandbytes' int8 eval path also quantises the inputs; training mode is the math we export
    with torch.no_grad():
        expected = model(x)
    exported = merge_and_unload(dequantize_model(model))
    assert all(type(getattr(exported, name)) is nn.Linear for name in CHAIN_LAYERS)
    assert exported.state_dict().keys() == chain().state_dict().keys()
    assert all(v.dtype == torch.float32 for v in exported.state_dict().values())
    with torch.no_grad():
        assert_parity(exported(x), expected)


@pytest.mark.parametrize("option", OPTIONS)
def test_save_merged_model_of_a_qlora_model_writes_a_full_precision_checkpoint(tmp_path, option: str) -> None:
    model = qlora_chain(OPTIONS[option])
    with pytest.raises(ValueError, match="dequantize=True"):
        save_merged_model(model, tmp_path / "refused")
    x = chain_batch()
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_merged_model(model, tmp_path / "dequantized", dequantize=True)  # leaves the model as it is
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    save_merged_model(dequantize_model(model), tmp_path / "merged")
    for directory in ("dequantized", "merged"):
        written = load_merged_state_dict(tmp_path / directory)
        assert written.keys() == chain().state_dict().keys()
        exported = chain()
        exported.load_state_dict(written)
        with torch.no_grad():
            assert_parity(exported(x), expected)


def test_adapter_state_dict_does_not_depend_on_the_base_quantization() -> None:
    quantized = qlora_chain(OPTIONS["nf4"])
    plain = apply_lora(chain(), LoraConfig(r=4, alpha=8, target_modules=["first", "last"]))
    ours, theirs = adapter_state_dict(quantized), adapter_state_dict(plain)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    load_adapter_state_dict(plain, ours)
    for key, value in adapter_state_dict(plain).items():
        assert torch.equal(value, ours[key])


@pytest.mark.parametrize("file_format", ["peft", "lightning_lora"])
def test_a_qlora_adapter_file_loads_into_a_full_precision_model_without_quantizing_it(
    file_format: str, tmp_path
) -> None:
    quantized = qlora_chain(OPTIONS["nf4"])
    save_adapter(quantized, tmp_path, format=file_format)
    plain = load_adapter(chain(), tmp_path)
    assert not quantized_layers(plain)
    assert all(torch.equal(getattr(plain, n).weight, getattr(chain(), n).weight) for n in CHAIN_LAYERS)
    loaded = adapter_state_dict(plain)
    assert all(torch.equal(loaded[key], value) for key, value in adapter_state_dict(quantized).items())


def test_a_loftq_adapter_reloads_exactly_onto_a_base_quantized_from_its_saved_config(tmp_path) -> None:
    config = LoraConfig(r=8, target_modules=["first", "last"], init="loftq_iter_2", quantization=OPTIONS["nf4"])
    trained = apply_lora(chain(), config)
    randomize_adapters(trained)  # stands for training
    save_adapter(trained, tmp_path, format="lightning_lora")
    rebuilt = chain()
    apply_lora(rebuilt, read_adapter_config(tmp_path, rebuilt))  # re-runs LoftQ: the same quantised base
    load_adapter(rebuilt, tmp_path)
    x = chain_batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.train()(x), trained.train()(x), rtol=0, atol=0)


def test_loading_a_loftq_adapter_onto_a_model_without_its_base_is_refused(tmp_path) -> None:
    config = LoraConfig(r=8, target_modules=["first", "last"], init="loftq_iter_2", quantization=OPTIONS["nf4"])
    save_adapter(apply_lora(chain(), config), tmp_path, format="lightning_lora")
    full_precision = chain()
    before = _snapshot(full_precision)
    with pytest.raises(ValueError, match=r"LoftQ.*apply_lora\(model, read_adapter_config"):
        load_adapter(full_precision, tmp_path)
    _assert_unchanged(full_precision, before)


def _snapshot(model: nn.Module) -> dict:
    return {
        "classes": {name: type(m) for name, m in model.named_modules()},
        "weights": {name: m.weight for name, m in model.named_modules() if hasattr(m, "weight")},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["classes"] == before["classes"]
    assert all(after["weights"][k] is w for k, w in before["weights"].items())
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())


def _narrow_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64))


ERROR_CASES = {
    # name: (model builder, config, message)
    "already quantised differently": (
        lambda: bitsandbytes_chain(8),
        LoraConfig(r=4, target_modules=["first"], quantization=QuantizationConfig(bits=4)),
        "already quantised as 8-bit",
    ),
    "loftq on a quantised layer": (
        lambda: bitsandbytes_chain(4),
        LoraConfig(r=4, target_modules=["first"], init="loftq", quantization=QuantizationConfig(bits=4)),
        "needs the full-precision weight",
    ),
    "nothing linear to quantise": (
        lambda: nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64)),
        LoraConfig(r=4, target_modules=["0"], quantization=QuantizationConfig()),
        "no selected layer is an nn.Linear",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_quantization_errors_name_the_fix_and_leave_the_model_unchanged(case: str) -> None:
    build, config, message = ERROR_CASES[case]
    model = build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    _assert_unchanged(model, before)


NARROW_CONFIG = LoraConfig(r=4, target_modules=["0", "2"], quantization=QuantizationConfig())


def _kernel_is_correct(in_features: int) -> bool:
    return quantization._4bit_kernel_dequantizes_correctly(in_features, ("nf4", False), "cpu")


@pytest.fixture
def fresh_kernel_probe():
    """The probe's answers are cached per shape; forget them around a test that changes the kernel."""
    quantization._4bit_kernel_dequantizes_correctly.cache_clear()
    yield
    quantization._4bit_kernel_dequantizes_correctly.cache_clear()


def _per_row_block_kernel(data: torch.Tensor, state, *args, **kwargs) -> torch.Tensor:
    """bitsandbytes 0.50's faulty CPU dequantisation (AVX512-BF16 machines), simulated: blocks cut per row."""
    scales = quantized_weights.dense_scales(state)
    return reference_dequantize_4bit(data, state, scales, per_row_blocks=True).to(state.dtype)


@pytest.mark.parametrize("in_features", [48, 100, 64, 128])
@pytest.mark.usefixtures("fresh_kernel_probe")
def test_the_kernel_probe_agrees_with_a_reference_dequantisation(in_features: int) -> None:
    weight = torch.randn(8, in_features, generator=torch.Generator().manual_seed(3))
    data, state = quantized_weights.quantize_tensor(weight, QuantizationConfig())
    reference = reference_dequantize_4bit(data, state, quantized_weights.dense_scales(state))
    kernel_is_right = torch.equal(bnb.functional.dequantize_4bit(data, state).float(), reference)
    assert _kernel_is_correct(in_features) == kernel_is_right


@pytest.mark.parametrize("in_features", [48, 100, 64, 128])
@pytest.mark.usefixtures("fresh_kernel_probe")
def test_the_kernel_probe_detects_a_kernel_that_cuts_blocks_per_row(
    monkeypatch: pytest.MonkeyPatch, in_features: int
) -> None:
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", _per_row_block_kernel)
    assert _kernel_is_correct(in_features) == (in_features % 64 == 0)


def test_narrow_4bit_layers_are_accepted_exactly_where_the_installed_kernel_is_correct() -> None:
    """Where the kernel dequantises in_features=48 correctly the layers quantise and compute with the quantised
    weights; where it does not, the refusal names the layer and the fix (test_a_broken_kernel_... forces that)."""
    model = _narrow_model()
    if not _kernel_is_correct(48):
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"Cannot quantise 2 to 4 bit.*in_features=48.*exclude_modules"):
            apply_lora(model, NARROW_CONFIG)
        _assert_unchanged(model, before)
        return
    apply_lora(model, NARROW_CONFIG)
    assert [name for name, _ in quantized_layers(model)] == ["0", "2"]
    randomize_adapters(model)

    def reference_layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        state = layer.weight.quant_state
        weight = reference_dequantize_4bit(layer.weight.data, state, quantized_weights.dense_scales(state))
        update = h @ layer.lora_A["default"].t() @ layer.lora_B["default"].t()
        return F.linear(h, weight, layer.bias) + layer.scaling("default") * update

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference_layer(model[2], torch.relu(reference_layer(model[0], x)))
        assert_parity(model(x), expected)


@pytest.mark.usefixtures("fresh_kernel_probe")
def test_a_broken_kernel_is_refused_by_layer_name_and_leaves_the_model_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", _per_row_block_kernel)
    model = _narrow_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot quantise 2 to 4 bit on cpu.*in_features=48.*bits=8") as error:
        apply_lora(model, NARROW_CONFIG)
    assert "Cannot quantise 0 " not in str(error.value)  # in_features=64 is fine on that kernel too
    _assert_unchanged(model, before)


def test_a_failure_while_quantizing_restores_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = chain()
    before = _snapshot(model)
    real_quantize = quantization.quantize_linear
    done: list[nn.Module] = []

    def quantize_then_fail(module: nn.Module, options: QuantizationConfig) -> nn.Module:
        if done:
            raise RuntimeError("out of memory")
        done.append(module)
        return real_quantize(module, options)

    monkeypatch.setattr(quantization, "quantize_linear", quantize_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_lora(model, LoraConfig(r=4, target_modules=["first", "last"], quantization=OPTIONS["nf4"]))
    assert done  # one layer had been quantised
    _assert_unchanged(model, before)


@pytest.mark.parametrize("upcast", ["all", "norms"])
def test_prepare_for_kbit_training_upcasts_half_precision_parameters_and_trains(upcast: str) -> None:
    model = llama64().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, quantization=QuantizationConfig(compute_dtype="bfloat16")))
    prepare_for_kbit_training(model, upcast=upcast)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    expected_embedding_dtype = torch.float32 if upcast == "all" else torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == expected_embedding_dtype
    assert all(isinstance(m.weight, bnb.nn.Params4bit) for _, m in quantized_layers(model))
    model.train()
    # "norms" is meant for autocast training (Lightning's "bf16-mixed"); "all" trains without it.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=upcast == "norms"):
        loss = model(input_ids=token_batch(), labels=token_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for _, p in adapter_parameters(model, "default"))


def test_prepare_for_kbit_training_lets_gradients_reach_adapters_in_checkpointed_blocks() -> None:
    tokens = token_batch()

    def grads(checkpointing: bool, prepare: bool) -> dict[str, torch.Tensor]:
        model = checkpointed_stack(checkpointing)
        apply_lora(model, LoraConfig(r=4, target_modules=["blocks.0", "blocks.1"], quantization=OPTIONS["nf4"]))
        randomize_adapters(model)
        if prepare:
            prepare_for_kbit_training(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
            out = model(tokens)
        if out.requires_grad:  # without prepare nothing upstream of the head requires grad
            out.square().mean().backward()
        return {key: p.grad for key, p in adapter_parameters(model, "default")}

    reference = grads(checkpointing=False, prepare=False)
    assert all(g is None for g in grads(checkpointing=True, prepare=False).values())  # the problem it solves
    for key, grad in grads(checkpointing=True, prepare=True).items():
        assert_parity(grad, reference[key], msg=key)


def test_prepare_for_kbit_training_refuses_checkpointing_a_model_that_cannot() -> None:
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        prepare_for_kbit_training(chain(), gradient_checkpointing=True)


def test_quantization_options_round_trip_through_a_dict_and_reject_bad_values() -> None:
    config = LoraConfig(r=4, quantization=QuantizationConfig(bits=4, quant_type="fp4", double_quant=True))
    assert LoraConfig.from_dict(config.to_dict()) == config
    for bad, message in [({"bits": 3}, "bits"), ({"quant_type": "int4"}, "quant_type"), ({"blocks": 64}, "blocks")]:
        with pytest.raises(ValueError, match=message):
            LoraConfig(quantization=bad)


def test_quantization_options_parse_from_a_lightning_cli_style_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--lora", type=LoraConfig)
    yaml = "lora:\n  r: 4\n  init: loftq\n  quantization:\n    bits: 4\n    quant_type: fp4\n    double_quant: true\n"
    config = parser.instantiate(parser.parse_string(yaml)).lora
    assert config.quantization == QuantizationConfig(bits=4, quant_type="fp4", double_quant=True)
    assert dataclasses.asdict(config)["quantization"]["quant_type"] == "fp4"


def _quiet_trainer(**options):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **options,
    )


def test_lora_callback_sanity_check_and_validation_leave_qlora_adapter_gradients_exact() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora.lightning import LoraCallback

    class ChainModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = chain()
            self.grads: list[dict[str, torch.Tensor]] = []

        def on_fit_start(self) -> None:  # after LoraCallback added the adapter
            randomize_adapters(self.model)
            self.initial = {k: v.clone() for k, v in adapter_state_dict(self.model).items()}

        def training_step(self, batch: list, batch_index: int) -> torch.Tensor:
            return self.model(batch[0]).square().mean()

        def validation_step(self, batch: list, batch_index: int) -> None:
            self.log("val_loss", self.model(batch[0]).square().mean())

        def on_after_backward(self) -> None:
            self.grads.append({key: p.grad.clone() for key, p in adapter_parameters(self.model, "default")})

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)  # adapters stay put

    config = LoraConfig(r=4, alpha=8, target_modules=["first", "last"], quantization=OPTIONS["nf4"])
    module = ChainModule()
    data = DataLoader(TensorDataset(chain_batch()), batch_size=6)
    trainer = _quiet_trainer(max_steps=2, val_check_interval=1, num_sanity_val_steps=1)
    trainer.callbacks.append(LoraCallback(config, submodule="model"))
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert len(quantized_layers(module.model)) == 3 and len(module.grads) == 2  # after the sanity check / a val run

    reference = apply_lora(chain(), config)
    load_adapter_state_dict(reference, module.initial)
    expected = adapter_grads(reference, chain_batch())
    for grads in module.grads:
        for key, grad in expected.items():
            torch.testing.assert_close(grads[key], grad, rtol=0, atol=0, msg=key)


def test_qlora_training_through_lora_callback_lowers_the_loss() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora.lightning import LoraCallback

    class LlamaModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = llama64().train()
            self.losses: list[float] = []

        def training_step(self, batch: list, batch_index: int) -> torch.Tensor:
            loss = self.model(input_ids=batch[0], labels=batch[0]).loss
            self.losses.append(loss.item())
            return loss

        def validation_step(self, batch: list, batch_index: int) -> None:
            self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(lora_param_groups(self, lr=1e-2))

    module = LlamaModule()
    data = DataLoader(TensorDataset(token_batch(length=12)), batch_size=2)
    callback = LoraCallback(LoraConfig(r=8, alpha=16, quantization=OPTIONS["nf4"]), submodule="model")
    trainer = _quiet_trainer(max_steps=12, num_sanity_val_steps=1)  # one batch per epoch: a validation run each step
    trainer.callbacks.append(callback)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert len(quantized_layers(module.model)) == 14
    assert module.losses[-1] < 0.8 * module.losses[0]


def test_lora_callback_refuses_to_write_merged_weights_from_a_quantised_base(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora.lightning import LoraCallback

    class LlamaModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = llama64().train()

        def training_step(self, batch: list, batch_index: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(lora_param_groups(self, lr=1e-2))

    callback = LoraCallback(
        LoraConfig(r=8, alpha=16, quantization=OPTIONS["nf4"]),
        submodule="model",
        merge_on_fit_end=True,
        merged_weights_dir=tmp_path / "merged",
    )
    trainer = _quiet_trainer(max_steps=2)
    trainer.callbacks.append(callback)
    with pytest.raises(ValueError, match=r"save_merged_model\(model, directory, dequantize=True\)"):
        trainer.fit(LlamaModule(), train_dataloaders=DataLoader(TensorDataset(token_batch(length=12)), batch_size=2))
    assert not (tmp_path / "merged").exists()

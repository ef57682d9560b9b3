"""The contract every adapter kind keeps, run over the table in ``kind_cases.py`` (one row per kind and option set),
and each kind's numbers against HF PEFT's implementation of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kind_cases import CASE_MODEL_PAIRS, KIND_CASES, build, deep, model_input, randomized, targets
from numerics import assert_parity
from quantized_models import bitsandbytes_chain, chain_batch, validation_pass

from lightning_lora import (
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    VeraConfig,
    adapter_state_dict,
    apply_lora,
    delete_adapter,
    dequantize_model,
    disable_adapters,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_adapter,
    set_active_adapters,
    unmerge_lora,
)
from lightning_lora.core.kinds import kind_of

peft = pytest.importorskip("peft")


def adapted(case: str, model_name: str, random: bool = True, **overrides) -> tuple[nn.Module, nn.Module]:
    """``(base, adapted copy)``; with ``random`` the adapter starts away from the identity."""
    base = build(model_name)
    model = apply_lora(deep(base), KIND_CASES[case].config(targets(model_name), **overrides))
    return base, randomized(model) if random else model


def peft_model(case: str, model_name: str, base: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """PEFT's adapter of the same kind, with PEFT's non-identity init, then cast to ``dtype``."""
    torch.manual_seed(7)
    return peft.get_peft_model(deep(base), KIND_CASES[case].peft_config(targets(model_name))).to(dtype)


def float64_input(model_name: str) -> torch.Tensor:
    """The model's input in float64, for the PEFT parity tests, whose models are cast to float64: both sides then
    agree to float64 rounding, whatever order the CPU sums in."""
    x = model_input(model_name)
    return x.double() if x.is_floating_point() else x


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----- the contract of every kind -----
@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
def test_outputs_at_init_equal_the_base_model(case: str, model_name: str) -> None:
    base, model = adapted(case, model_name, random=False)
    x = model_input(model_name)
    if not KIND_CASES[case].starts_at_identity:  # the method itself starts elsewhere (VB-LoRA, as in PEFT)
        assert not torch.allclose(model(x), base(x), atol=1e-4)
        return
    assert_parity(model(x), base(x))


@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
def test_training_changes_only_the_adapter(case: str, model_name: str) -> None:
    base, model = adapted(case, model_name)
    before = plain_state(model)
    adapter_keys = set(adapter_state_dict(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        model(model_input(model_name, seed=step)).square().mean().backward()
        optimizer.step()
    after = model.state_dict()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_keys
    for key, value in before.items():
        if key in adapter_keys:
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:
            assert torch.equal(after[key], value), f"{key} of the frozen base changed"


@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
def test_merge_equals_unmerged_outputs_and_unmerge_restores_the_weights(case: str, model_name: str) -> None:
    _, model = adapted(case, model_name)
    x = model_input(model_name)
    weights = {name: layer.weight.detach().clone() for name, layer in lora_layers(model)}
    expected = model(x)
    merge_lora(model)
    assert_parity(model(x), expected, msg="merged")
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        assert_parity(layer.weight, weights[name], msg=name)
    assert_parity(model(x), expected, msg="unmerged")


@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
@pytest.mark.parametrize("file_format", ["lightning_lora", "peft"])
def test_save_then_load_gives_the_same_model(case: str, model_name: str, file_format: str, tmp_path) -> None:
    base, model = adapted(case, model_name)
    save_adapter(model, tmp_path, format=file_format)
    loaded = load_adapter(deep(base), tmp_path)
    assert type(loaded.lin0.lora_settings["default"].config) is KIND_CASES[case].config_class
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(loaded)[key], value), key
    x = model_input(model_name)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
def test_delete_restores_the_base_model_bit_for_bit(case: str, model_name: str) -> None:
    base, model = adapted(case, model_name)
    delete_adapter(model, "default")
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", [c for c in KIND_CASES if KIND_CASES[c].unsupported_layer is not None])
def test_a_layer_type_the_kind_cannot_adapt_is_refused_and_the_model_untouched(case: str) -> None:
    model = nn.Sequential(KIND_CASES[case].unsupported_layer(), nn.Linear(8, 8))
    before = plain_state(model)
    classes = [type(m) for m in model.modules()]
    kind = kind_of(KIND_CASES[case].config(["0"]))
    with pytest.raises(ValueError, match=rf"An? {kind.display_name} adapter cannot go on 0 .*exclude_modules"):
        apply_lora(model, KIND_CASES[case].config(["1", "0"]))
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_an_option_a_kind_does_not_have_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="use_dora"):
        LoHaConfig(r=4, use_dora=True)
    with pytest.raises(ValueError, match="Give exactly one of r .* and oft_block_size"):
        OFTConfig(r=4, oft_block_size=8)


def test_a_block_size_that_does_not_fit_the_layer_is_refused_with_divisors_and_the_model_untouched() -> None:
    model = build("mlp")  # lin0 reads 12 features
    before = plain_state(model)
    with pytest.raises(ValueError, match=r"oft_block_size=5 does not divide the 12 features .* lin0 .*\[4, 6\]"):
        apply_lora(model, OFTConfig(oft_block_size=5, target_modules=["lin0", "lin1"]))
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["loha", "oft", "boft", "vera", "vblora", "adalora"])
def test_a_peft_file_with_an_option_we_lack_is_refused_by_name(case: str, tmp_path) -> None:
    import json

    base = build("mlp")
    save_adapter(adapted(case, "mlp")[1], tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = deep(base)
    with pytest.raises(ValueError, match="some_future_option"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


# ----- each kind against PEFT -----
@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
def test_a_peft_adapter_loads_with_peft_outputs_and_merges_like_peft(case: str, model_name: str, tmp_path) -> None:
    theirs = peft_model(case, model_name, build(model_name), torch.float64)
    base, x = build(model_name).double(), float64_input(model_name)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(deep(base), tmp_path)
    unmerged = ours(x)
    assert unmerged.dtype == torch.float64
    assert not torch.allclose(unmerged, base(x), atol=1e-3)  # PEFT's init is not the identity here
    if model_name not in KIND_CASES[case].peft_forward_wrong_on:
        assert_parity(unmerged, theirs(x), msg="unmerged")
    merged_theirs, merged_ours = theirs.merge_and_unload(), merge_and_unload(ours)
    assert not lora_layers(merged_ours)
    assert_parity(merged_ours(x), merged_theirs(x), msg="merged vs PEFT merged")
    assert_parity(merged_ours(x), unmerged, msg="merged vs unmerged")


@pytest.mark.parametrize("case, model_name", CASE_MODEL_PAIRS)
def test_our_adapter_loads_in_peft_with_our_outputs(case: str, model_name: str, tmp_path) -> None:
    base, x = build(model_name).double(), float64_input(model_name)
    ours = randomized(apply_lora(deep(base), KIND_CASES[case].config(targets(model_name))))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(deep(base), tmp_path)
    if model_name in KIND_CASES[case].peft_forward_wrong_on:
        theirs = theirs.merge_and_unload()
    expected = ours(x)
    assert expected.dtype == torch.float64
    assert_parity(theirs(x), expected)


def _our_key(peft_name: str) -> str:
    """Our state-dict key for a PEFT parameter name (``base_model.model.conv.lora_A.default.weight``)."""
    key = peft_name.removeprefix("base_model.model.")
    renamed = {"lora_magnitude_vector": "lora_magnitude", "lora_embedding_": "lora_", "oft_embedding_R": "oft_R"}
    for theirs, ours in renamed.items():
        key = key.replace(theirs, ours)
    if ".vblora_vector_bank." in key:  # PEFT names its one bank after the first layer; ours: the module holding it
        key = key[key.index("vblora_vector_bank."):]
    return key.removesuffix(".weight") if key.endswith(".default.weight") else key


@pytest.mark.parametrize(
    "case, model_name", [(c, m) for c, m in CASE_MODEL_PAIRS if m not in KIND_CASES[c].peft_forward_wrong_on]
)
def test_forward_and_gradients_equal_peft_for_the_same_tensors(case: str, model_name: str, tmp_path) -> None:
    theirs = peft_model(case, model_name, build(model_name), torch.float64)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(build(model_name).double(), tmp_path)
    results = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        model.train()
        x = float64_input(model_name)
        x.requires_grad_(x.is_floating_point())
        out = model(x)
        assert out.dtype == torch.float64
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads = {_our_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (out.detach(), x.grad, grads)
    (out, x_grad, grads), (peft_out, peft_x_grad, peft_grads) = results["ours"], results["theirs"]
    assert_parity(out, peft_out, msg="output")
    if x_grad is not None or peft_x_grad is not None:
        assert_parity(x_grad, peft_x_grad, msg="input gradient")
    assert grads.keys() == peft_grads.keys()
    for key, grad in grads.items():
        *layer_path, container, _ = key.split(".")
        cp_layer = hasattr(ours.get_submodule(".".join(layer_path)), "hada_t1")
        if cp_layer and container in KIND_CASES[case].peft_wrong_cp_gradients:
            continue  # PEFT is wrong there; test_loha_cp_gradients_are_exact_where_peft_is_not checks ours
        assert_parity(grad, peft_grads[key].reshape(grad.shape), msg=key)


def test_loha_cp_gradients_are_exact_where_peft_is_not(tmp_path) -> None:
    """PEFT 0.21's ``HadaWeightCP.backward`` builds the gradient of ``hada_w1_a`` from the second factor's
    ``hada_t2``/``hada_w2_b`` (and that of ``hada_w2_a`` from the first's); autograd gives the exact one."""
    base = build("conv2d").double()
    config = LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=["conv"], init_weights=False)
    ours = apply_lora(deep(base), config)
    x = model_input("conv2d").double()
    names = [f"conv.{name}.default" for name in ours.conv.adapter_containers("default")]
    values = tuple(ours.get_parameter(name).detach().clone().requires_grad_(True) for name in names)

    def output(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(ours, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(output, values, eps=1e-6, atol=1e-6)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(deep(base), tmp_path, is_trainable=True)
    for model in (ours, theirs):
        model(x).sum().backward()
    ours_grad = ours.conv.hada_w1_a["default"].grad
    theirs_grad = theirs.base_model.model.conv.hada_w1_a["default"].grad
    assert not torch.allclose(ours_grad, theirs_grad, atol=1e-3)
    same = (ours.conv.hada_w1_b["default"].grad, theirs.base_model.model.conv.hada_w1_b["default"].grad)
    assert_parity(*same)  # the other factors agree


@pytest.mark.parametrize("case", list(KIND_CASES))
def test_each_kind_trains_on_a_4bit_base_like_on_its_dequantized_weights(case: str) -> None:
    pytest.importorskip("bitsandbytes")
    model = bitsandbytes_chain(4)
    validation_pass(model)  # bitsandbytes may repack 4-bit weights for CPU inference here
    apply_lora(model, KIND_CASES[case].config(["first", "last"]))
    randomized(model)
    reference = dequantize_model(deep(model))
    results = []
    for candidate in (model, reference):
        candidate.train()
        x = chain_batch().requires_grad_(True)
        out = candidate(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in candidate.named_parameters() if p.requires_grad}))
    (out, x_grad, grads), (ref_out, ref_x_grad, ref_grads) = results
    assert_parity(out, ref_out, msg="output")
    assert_parity(x_grad, ref_x_grad, msg="input gradient")
    assert grads.keys() == ref_grads.keys() and grads
    for key, grad in grads.items():
        assert_parity(grad, ref_grads[key], msg=key)


def test_oft_on_a_3x3_conv_computes_its_merged_weight_where_peft_does_not(tmp_path) -> None:
    """PEFT 0.21's OFT rotates unfolded 3x3 patches and folds them back with a sum, so overlapping pixels count
    several times: even the identity rotation changes the output. Ours runs the conv with the rotated kernel."""
    base = build("conv2d")
    x = model_input("conv2d")
    identity_theirs = peft.get_peft_model(deep(base), peft.OFTConfig(target_modules=["conv"], oft_block_size=3))
    identity_ours = apply_lora(deep(base), OFTConfig(target_modules=["conv"], oft_block_size=3))
    assert not torch.allclose(identity_theirs(x), base(x), atol=1e-2)
    assert_parity(identity_ours(x), base(x))
    trained = randomized(identity_ours)
    expected = merge_and_unload(deep(trained))(x)
    assert_parity(trained(x), expected)


def test_vera_projections_are_held_once_in_memory_and_once_in_files(tmp_path) -> None:
    from safetensors.torch import load_file

    base = build("mlp")
    model = apply_lora(deep(base), VeraConfig(r=4, target_modules=["lin0", "lin1"]))
    apply_lora(model, VeraConfig(r=2, projection_prng_key=5, target_modules=["lin1"]), "second")
    assert model.lin0.vera_A is model.lin1.vera_A  # one holder, a child of both layers
    assert model.lin0.vera_A["default"].shape == (4, 20)  # [r, the largest in_features]
    assert model.lin1.vera_A["second"].shape == (2, 20)
    assert not any("vera_A" in key or "vera_B" in key for key in model.state_dict())  # rebuilt from the key
    save_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "native", format="lightning_lora")
    peft_keys = [k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors") if "vera_A" in k]
    native_keys = [k for k in load_file(tmp_path / "native" / "adapter_model.safetensors") if "vera_A" in k]
    assert peft_keys == ["base_model.vera_A"] and native_keys == ["vera_A"]
    delete_adapter(model, "default")
    assert "default" not in model.lin1.vera_A and "second" in model.lin1.vera_A
    assert not hasattr(model.lin0, "vera_A")  # lin0 has no VeRA adapter left


def test_a_vera_file_with_other_projections_loads_them_and_refuses_other_shapes(tmp_path) -> None:
    base = build("mlp")
    saved = randomized(apply_lora(deep(base), VeraConfig(r=4, target_modules=["lin0", "lin1"])))
    with torch.no_grad():
        saved.lin0.vera_A["default"].mul_(2.0)  # projections that the key does not rebuild
    save_adapter(saved, tmp_path)
    loaded = load_adapter(deep(base), tmp_path)
    x = model_input("mlp")
    torch.testing.assert_close(loaded(x), saved(x), atol=0, rtol=0)
    other = apply_lora(deep(base), VeraConfig(r=4, target_modules=["lin0"]))  # smaller max_in: [4, 12]
    before = plain_state(other)
    with pytest.raises(ValueError, match=r"vera_A: file \(4, 20\) vs model \(4, 12\)"):
        load_adapter(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# ----- kinds side by side -----
def test_adapters_of_two_kinds_on_one_layer_add_switch_disable_and_delete() -> None:
    base = build("mlp")
    x = model_input("mlp")
    only_lora = randomized(apply_lora(deep(base), LoraConfig(r=2, target_modules=["lin0"])))
    only_lokr = apply_lora(deep(base), LoKrConfig(r=2, target_modules=["lin0"], init_weights=False), "kron")
    both = deep(only_lora)
    apply_lora(both, LoKrConfig(r=2, target_modules=["lin0"]), "kron")
    with torch.no_grad():
        for key, value in adapter_state_dict(only_lokr, "kron").items():
            both.state_dict()[key].copy_(value)
    expected_lin0 = base.lin0(x) + (only_lora.lin0(x) - base.lin0(x)) + (only_lokr.lin0(x) - base.lin0(x))
    assert_parity(both.lin0(x), expected_lin0)
    set_active_adapters(both, "kron")
    assert_parity(both(x), only_lokr(x))
    set_active_adapters(both, ["default", "kron"])
    with disable_adapters(both):
        torch.testing.assert_close(both(x), base(x), atol=0, rtol=0)
    merge_lora(both)
    assert_parity(both.lin0(x), expected_lin0, msg="merged")
    unmerge_lora(both)
    delete_adapter(both, "default")
    assert_parity(both(x), only_lokr(x), msg="after delete")
    assert list(both.lin0.lora_settings) == ["kron"] and not hasattr(both.lin0, "lora_A")

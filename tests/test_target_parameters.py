"""``target_parameters``: LoRA on parameters, here the fused 3-D expert weights of a transformers Mixtral built
from a config (one rank-r update per expert). Forward, gradients, merge and files both ways equal PEFT's (compared in
float32: the experts' grouped matmul, ``torch._grouped_mm``, refuses float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    LoraConfig,
    apply_lora,
    delete_adapter,
    load_adapter,
    load_merged_state_dict,
    merge_lora,
    save_adapter,
    save_merged_model,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CONFIG = LoraConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)


def tiny_mixtral(seed: int = 0) -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _ours() -> nn.Module:
    model = apply_lora(tiny_mixtral(), CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _peft_twin(ours: nn.Module) -> nn.Module:
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    state = theirs.state_dict()
    with torch.no_grad():  # PEFT nests one wrapper per parameter: gate_up_proj (first) innermost
        for layer in range(2):
            for factor in ("lora_A", "lora_B"):
                experts = ours.model.layers[layer].mlp.experts.lora_parameters
                prefix = f"base_model.model.model.layers.{layer}.mlp.experts."
                inner = getattr(experts.gate_up_proj, factor)["default"]
                state[f"{prefix}base_layer.{factor}.default.weight"].copy_(inner)
                state[f"{prefix}{factor}.default.weight"].copy_(getattr(experts.down_proj, factor)["default"])
                attention = f"base_model.model.model.layers.{layer}.self_attn.q_proj.{factor}.default.weight"
                state[attention].copy_(getattr(ours.model.layers[layer].self_attn.q_proj, factor)["default"])
    return theirs


def test_one_update_per_expert_with_peft_shapes() -> None:
    model = apply_lora(tiny_mixtral(), CONFIG)
    sites = model.model.layers[0].mlp.experts.lora_parameters
    assert sites.gate_up_proj.lora_A["default"].shape == (4 * 2, 16)  # [experts * r, in]
    assert sites.gate_up_proj.lora_B["default"].shape == (48, 4 * 2)  # [out, experts * r]
    assert sites.down_proj.lora_A["default"].shape == (4 * 2, 24)
    assert not model.model.layers[0].mlp.experts.gate_up_proj.requires_grad
    with torch.no_grad():  # B starts at zero: the model is unchanged
        assert_parity(model(input_ids=_ids()).logits, tiny_mixtral()(input_ids=_ids()).logits)


def test_forward_gradients_and_merge_equal_peft() -> None:
    ours = _ours()
    theirs = _peft_twin(ours)
    ids = _ids()
    got, expected = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    with torch.no_grad():
        assert (got - tiny_mixtral()(input_ids=ids).logits).abs().max() > 1e-3  # the experts' updates act
    assert_parity(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()
    sites = ours.model.layers[1].mlp.experts.lora_parameters
    prefix = "base_model.model.model.layers.1.mlp.experts."
    theirs_params = dict(theirs.named_parameters())
    for site, peft_name in ((sites.gate_up_proj, f"{prefix}base_layer.lora_A.default.weight"),
                            (sites.down_proj, f"{prefix}lora_A.default.weight")):
        assert_parity(site.lora_A["default"].grad, theirs_params[peft_name].grad)
    with torch.no_grad():
        weight = ours.model.layers[0].mlp.experts.down_proj.detach().clone()
        assert_parity(merge_lora(ours)(input_ids=ids).logits, got)
        theirs.merge_adapter()
        assert_parity(ours.model.layers[0].mlp.experts.down_proj,
                      theirs.base_model.model.model.layers[0].mlp.experts.get_base_layer().down_proj)
        unmerge_lora(ours)
        assert_parity(ours.model.layers[0].mlp.experts.down_proj, weight)


def test_files_go_both_ways_with_peft(tmp_path: Path) -> None:
    ours = _ours()
    ids = _ids()
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        from_ours = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "ours")
        assert_parity(from_ours(input_ids=ids).logits, expected)
        from_ours.save_pretrained(tmp_path / "peft")
        loaded = load_adapter(tiny_mixtral(), tmp_path / "peft")
        assert_parity(loaded(input_ids=ids).logits, expected)
        native = load_adapter(tiny_mixtral(), save_adapter(ours, tmp_path / "native", format="lightning_lora"))
        assert_parity(native(input_ids=ids).logits, expected)


def test_the_merged_export_holds_the_updated_experts(tmp_path: Path) -> None:
    ours = _ours()
    save_merged_model(ours, tmp_path)
    fresh = tiny_mixtral(seed=3)
    fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
    with torch.no_grad():
        assert_parity(fresh(input_ids=_ids()).logits, ours(input_ids=_ids()).logits)


def test_deleting_the_adapter_gives_the_experts_module_back() -> None:
    model = apply_lora(tiny_mixtral(), CONFIG)
    experts = model.model.layers[0].mlp.experts
    delete_adapter(model, "default")
    assert type(experts).__name__ == "MixtralExperts" and "lora_parameters" not in experts._modules
    assert set(model.state_dict()) == set(tiny_mixtral().state_dict())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(target_modules=[], target_parameters=["experts.up"]), r"\['experts.up'\] match no parameter"),
        (LoraConfig(target_modules=[], target_parameters=EXPERTS, dropout=0.1), r"drop \['dropout'\]"),
        (LoraConfig(target_modules=[], target_parameters=EXPERTS, use_dora=True), r"drop \['use_dora'\]"),
        (LoraConfig(target_modules=[], target_parameters=["input_layernorm.weight"]), r"shape \[16\]"),
        (LoraConfig(target_modules=[], target_parameters=EXPERTS, rank_pattern={"down_proj": 4}),
         r"rank_pattern/alpha_pattern match the target parameters"),
    ],
)
def test_what_parameters_cannot_take_is_refused_by_name(config: LoraConfig, message: str) -> None:
    model = tiny_mixtral()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def test_copies_and_pickles_keep_their_own_experts() -> None:
    import copy
    import pickle

    model = _ours()
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(input_ids=ids).logits, expected, rtol=0, atol=0)
            site = clone.model.layers[0].mlp.experts.lora_parameters.down_proj
            assert site.weight is clone.model.layers[0].mlp.experts.down_proj  # its own owner, not the original's


def test_per_sample_adapters_are_refused_on_parameters_and_all_linear_stops_naming_them() -> None:
    from lightning_lora import mixed_adapter_batch

    with pytest.warns(UserWarning, match="'all-linear' adapts linear layers") as caught:
        model = apply_lora(tiny_mixtral(), LoraConfig(r=2, target_parameters=EXPERTS))
    message = str(next(w.message for w in caught if "all-linear" in str(w.message)))
    assert "mlp.gate.weight" in message and "experts" not in message.split("Adapt fused")[0]
    with pytest.raises(ValueError, match=r"adapt parameters \(target_parameters\)"):
        with mixed_adapter_batch(model, ["default", "default"]):
            pass


def test_a_2d_parameter_beside_an_adapted_layer_exports_under_a_name_peft_reads_alone(tmp_path: Path) -> None:
    def two_layers() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    model = apply_lora(two_layers(), LoraConfig(r=2, target_modules=["0"], target_parameters=["1.weight"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    save_adapter(model, tmp_path)  # "weight" alone would also select the adapted layer 0's weight in PEFT
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert_parity(peft.PeftModel.from_pretrained(two_layers(), tmp_path)(x), model(x))
    with pytest.raises(ValueError, match=r"target_parameters names \['0.weight'\], parameters of layers that"):
        apply_lora(two_layers(), LoraConfig(r=2, target_modules=["0"], target_parameters=["0.weight"]))
    site_pattern = {"lora_parameters.down_proj": 4}
    with pytest.raises(ValueError, match="rank_pattern/alpha_pattern match the target parameters"):
        apply_lora(tiny_mixtral(), LoraConfig(target_modules=[], target_parameters=EXPERTS, rank_pattern=site_pattern))

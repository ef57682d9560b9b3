"""EVA (incremental SVD of layer inputs with rank redistribution) through calibrate_adapters: components, ranks,
scalings and the written rank/alpha patterns equal PEFT's initialize_lora_eva_weights on the same batches; layers
left without rank lose their adapter; files both ways. Single process; the Lightning callback is in
test_calibration_lightning.py."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from models import tiny_llama, token_batch
from numerics import assert_parity
from torch import nn

import lightning_lora.core.inits.eva as eva
from lightning_lora import (
    EvaConfig,
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    calibrate_adapters,
    get_lora_config,
    load_adapter,
    load_adapter_state_dict,
    lora_layers,
    save_adapter,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # q/k/v and up share their inputs


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _base() -> nn.Module:
    return tiny_llama()


def fresh() -> nn.Module:
    return copy.deepcopy(_base())


def batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Language-model batches with padding and ignored labels (both left out of the SVD)."""
    result = []
    for i in range(count):
        ids = token_batch(batch=2, length=12, seed=20 + i)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[0, :3] = -100
        result.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return result


def config(r: int = 4, targets=TARGETS, **eva_options) -> LoraConfig:
    return LoraConfig(r=r, alpha=2 * r, target_modules=targets, init="eva", eva_config=EvaConfig(**eva_options))


def peft_eva(ours: LoraConfig, data: list) -> nn.Module:
    import peft
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    options = ours.eva_config
    peft_config = peft.LoraConfig(
        r=ours.r, lora_alpha=ours.alpha, target_modules=ours.target_modules, init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=options.rho, tau=options.tau, whiten=options.whiten),
    )  # fmt: skip
    model = peft.get_peft_model(fresh(), peft_config)
    initialize_lora_eva_weights(model, dataloader=data, show_progress_bar=False)
    return model


def calibrated(lora_config: LoraConfig, data=None) -> tuple[nn.Module, dict[str, int]]:
    model = apply_lora(fresh(), lora_config)
    return model, calibrate_adapters(model, batches() if data is None else data)["default"]


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def assert_matches_peft(lora_config: LoraConfig) -> dict[str, int]:
    ours, ranks = calibrated(lora_config)
    theirs = peft_eva(lora_config, batches())
    state = theirs.state_dict()
    written = get_lora_config(ours)
    for name, rank in ranks.items():
        key = f"base_model.model.{name}.lora_A.default.weight"
        if rank == 0:
            assert key not in state and name not in dict(lora_layers(ours)), name
            continue
        layer, twin = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert (written.rank_for(name), twin.r["default"]) == (rank, rank), name
        assert layer.lora_settings["default"].scaling == pytest.approx(twin.scaling["default"]), name
        assert written.alpha_for(name) == layer.lora_settings["default"].alpha
        assert_parity(layer.lora_A["default"], state[key], msg=name)
        assert not layer.lora_B["default"].any()
    return ranks


def test_eva_matches_peft_components_ranks_and_scalings() -> None:
    ranks = assert_matches_peft(config(r=4, rho=2.0))
    assert sum(ranks.values()) == 4 * len(ranks) and len(set(ranks.values())) > 1  # redistributed, same budget


def test_layers_left_without_rank_lose_their_adapter_as_in_peft() -> None:
    ranks = assert_matches_peft(config(r=2, rho=4.0))
    assert 0 in ranks.values()


def test_whitened_components_match_peft_on_layers_with_their_own_inputs() -> None:
    # PEFT whitens an SVD shared by layers with equal inputs once per layer; on unshared inputs the two agree.
    assert_matches_peft(config(r=4, targets=["o_proj", "down_proj"], rho=1.5, whiten=True))


def test_rho_one_keeps_every_rank_and_writes_no_pattern() -> None:
    model, ranks = calibrated(config(r=4, rho=1.0))
    assert set(ranks.values()) == {4}
    assert get_lora_config(model).rank_pattern == {} and get_lora_config(model).alpha_pattern == {}


def test_outputs_and_base_weights_are_unchanged_at_init() -> None:
    model, _ = calibrated(config(r=2, rho=4.0))
    tokens = token_batch()
    torch.testing.assert_close(logits(model, tokens), logits(fresh(), tokens), atol=0, rtol=0)
    base = fresh().state_dict()
    assert all(torch.equal(value, base[key]) for key, value in model.state_dict().items() if key in base)


def test_written_config_rebuilds_the_same_layers_and_shapes() -> None:
    model, ranks = calibrated(config(r=2, rho=4.0))
    rebuilt = apply_lora(fresh(), get_lora_config(model), initialize=False)
    assert {name: layer.lora_A["default"].shape[0] for name, layer in lora_layers(rebuilt)} == {
        name: rank for name, rank in ranks.items() if rank
    }
    load_adapter_state_dict(rebuilt, adapter_state_dict(model))
    assert calibrate_adapters(rebuilt, batches()) == {}  # restored: not pending, nothing to calibrate


def test_user_config_is_left_as_it_was() -> None:
    user_config = config(r=2, rho=4.0)
    before = copy.deepcopy(user_config)
    calibrated(user_config)
    assert user_config == before


def test_exported_eva_adapter_loads_in_peft_as_a_plain_lora(tmp_path) -> None:
    import peft

    model, _ = calibrated(config(r=2, rho=4.0))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=0.05)  # "trained"
    save_adapter(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    tokens = token_batch()
    assert_parity(logits(theirs, tokens), logits(model, tokens))
    mine = load_adapter(fresh(), tmp_path)  # and back
    assert_parity(logits(mine, tokens), logits(model, tokens))


def test_native_file_loads_without_calibrating(tmp_path, monkeypatch) -> None:
    model, _ = calibrated(config(r=2, rho=4.0))
    save_adapter(model, tmp_path, format="lightning_lora")
    monkeypatch.setattr(eva, "eva_components", lambda *args: pytest.fail("calibrated again"))
    loaded = load_adapter(fresh(), tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_redistribution_that_cannot_resize_is_refused_and_changes_nothing() -> None:
    model = apply_lora(fresh(), config(r=2, rho=4.0))
    shapes = {name: layer.lora_A["default"].shape for name, layer in lora_layers(model)}
    with pytest.raises(ValueError, match="rho=1.0"):
        calibrate_adapters(model, batches(), resize=False)
    assert {name: layer.lora_A["default"].shape for name, layer in lora_layers(model)} == shapes
    assert not any(layer.lora_settings["default"].initialized for _, layer in lora_layers(model))


def test_components_that_never_converge_raise_instead_of_cycling_forever(monkeypatch) -> None:
    monkeypatch.setattr(eva, "MAX_PASSES", 2)
    with pytest.raises(ValueError, match="did not converge"):
        calibrated(config(r=2, rho=4.0))


def test_eva_refuses_a_larger_rank_than_the_layer_inputs_allow() -> None:
    with pytest.raises(ValueError, match="input features"):
        calibrated(config(r=20, targets=["q_proj"], rho=2.0))


def test_batches_too_small_for_the_svd_are_an_error_not_an_endless_loop() -> None:
    small = [{"input_ids": token_batch(batch=1, length=4, seed=i)} for i in range(2)]  # 4 rows < 8 components
    with pytest.raises(ValueError, match="rows"):
        calibrated(config(r=4, targets=["o_proj"], rho=2.0), small)


@pytest.mark.parametrize("init", ["eva", "corda_ipm"])
def test_meta_device_model_stays_pending_through_materialisation_until_calibrated(init: str) -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    torch.manual_seed(0)
    base = build()
    lora = LoraConfig(r=2, alpha=4, target_modules=["0", "2"], init=init, eva_config=EvaConfig(rho=1.0))
    data = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.device("meta"):
        model = apply_lora(build(), lora)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # how FSDP materialises a meta model
    model.load_state_dict(base.state_dict(), strict=False)
    assert not any(layer.lora_settings["default"].initialized for _, layer in lora_layers(model))
    calibrate_adapters(model, data)
    reference = apply_lora(copy.deepcopy(base), lora)
    calibrate_adapters(reference, data)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model.state_dict().items())

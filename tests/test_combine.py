"""Weighted combination of adapters (``add_weighted_adapter``): every type against PEFT's on LoRA adapters of a tiny
Llama (equal ranks with differing alphas, and differing ranks), where PEFT is wrong (rsLoRA), exactness of the exact
types, other kinds through the SVD types, the result's files and merge, and the bad input refused with nothing
changed. The tiny Llamas run in float64, so ours and PEFT's agree to float64 rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kind_cases import build, model_input
from models import randomize_adapters, tiny_llama, token_batch
from numerics import RELATIVE_TOLERANCE, assert_parity
from peft_oracle import copy_adapter_into_peft, peft_key, peft_lora_config, peft_twin
from torch import nn

from lightning_lora import (
    LoHaConfig,
    LoraConfig,
    adapter_names,
    adapter_state_dict,
    add_weighted_adapter,
    apply_lora,
    get_lora_config,
    lora_layers,
    merge_lora,
    save_adapter,
    set_active_adapters,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
ALL_TYPES = [
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
EQUAL_RANKS = {
    "t1": LoraConfig(r=4, alpha=8, target_modules=TARGETS),
    "t2": LoraConfig(r=4, alpha=16, target_modules=TARGETS),
}
MIXED_RANKS = {
    "t1": LoraConfig(r=2, alpha=8, target_modules=TARGETS),
    "t2": LoraConfig(r=4, alpha=4, target_modules=["v_proj", "o_proj"]),
}  # overlapping target sets
WEIGHTS = [0.7, -0.4]


def _llama64() -> nn.Module:
    return tiny_llama().double()


def _pair(configs: dict[str, LoraConfig]) -> tuple[nn.Module, nn.Module]:
    """Our tiny Llama and PEFT's with the same random adapters, in float64."""
    ours = _llama64()
    for name, config in configs.items():
        apply_lora(ours, config, name)
    randomize_adapters(ours)
    names = list(configs)
    theirs = peft_twin(_llama64(), configs[names[0]], names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft_lora_config(configs[name]))
    with torch.no_grad():
        for name in names:
            copy_adapter_into_peft(ours, theirs, name)
    return ours, theirs


@pytest.fixture(autouse=True)
def same_dare_draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """DARE's masks from ``torch.bernoulli``, the n-th call of a combination drawing from seed n: PEFT also draws the
    new adapter's (discarded) init from the global generator first, so the global stream cannot line the two up."""
    calls = [0]

    def bernoulli(probabilities: torch.Tensor, *args: Any, generator: Any = None, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        draws = torch.rand(probabilities.shape, generator=torch.Generator().manual_seed(calls[0]))
        return (draws < probabilities).to(probabilities.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    return calls


def _combine_both(ours: nn.Module, theirs: nn.Module, combination_type: str, calls: list[int], **options: Any) -> None:
    calls[0] = 0
    add_weighted_adapter(ours, ["t1", "t2"], WEIGHTS, "mix", combination_type, **options)
    calls[0] = 0
    theirs.add_weighted_adapter(["t1", "t2"], WEIGHTS, "mix", combination_type, **options)


def _assert_same_tensors_and_outputs(ours: nn.Module, theirs: nn.Module) -> None:
    their_state = theirs.state_dict()
    mixed = adapter_state_dict(ours, "mix")
    assert mixed
    for key, value in mixed.items():
        assert value.dtype == torch.float64
        assert_parity(value, their_state[peft_key(key, "mix", their_state)], msg=key)
    set_active_adapters(ours, "mix")
    theirs.set_adapter("mix")
    ids = token_batch()
    with torch.no_grad():
        assert_parity(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, msg="logits")


@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_every_type_equals_peft_on_equal_rank_adapters_with_differing_alphas(
    combination_type: str, same_dare_draws
) -> None:
    ours, theirs = _pair(EQUAL_RANKS)
    _combine_both(ours, theirs, combination_type, same_dare_draws, density=0.5, majority_sign_method="total")
    _assert_same_tensors_and_outputs(ours, theirs)


@pytest.mark.parametrize(
    ("combination_type", "options"),
    [
        ("cat", {}),
        ("svd", {"svd_rank": 3}),
        ("svd", {"svd_clamp": 0.9}),
        ("ties_svd", {"density": 0.6}),
        ("magnitude_prune_svd", {"density": 0.3}),
        ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
    ],
)
def test_rank_changing_types_equal_peft_on_adapters_of_differing_ranks_and_targets(
    combination_type, options, same_dare_draws
) -> None:
    ours, theirs = _pair(MIXED_RANKS)
    _combine_both(ours, theirs, combination_type, same_dare_draws, **options)
    _assert_same_tensors_and_outputs(ours, theirs)
    adapted = {name.rsplit(".", 1)[-1] for name, layer in lora_layers(ours) if "mix" in layer.lora_settings}
    assert adapted == {"q_proj", "v_proj", "o_proj"}  # the union of the sources' layers


def _delta(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {name: layer.delta_weight(adapter) for name, layer in lora_layers(model) if adapter in layer.lora_settings}


def _weighted_sum(model: nn.Module) -> dict[str, torch.Tensor]:
    parts = [_delta(model, "t1"), _delta(model, "t2")]
    names = set(parts[0]) | set(parts[1])
    return {n: sum(w * part[n] for w, part in zip(WEIGHTS, parts) if n in part) for n in names}


def test_rslora_adapters_combine_exactly_where_peft_scales_the_result_by_sqrt_r() -> None:
    configs = {
        name: LoraConfig(r=4, alpha=alpha, target_modules=TARGETS, use_rslora=True)
        for name, alpha in (("t1", 8), ("t2", 2))
    }
    ours, theirs = _pair(configs)
    _combine_both(ours, theirs, "cat", [0])
    expected = _weighted_sum(ours)
    for name, delta in _delta(ours, "mix").items():
        assert_parity(delta, expected[name], msg=name)
        their_layer = theirs.base_model.model.get_submodule(name)
        # PEFT's new adapter inherits use_rslora with lora_alpha = r = 8: scaling 8 / sqrt(8) instead of 1
        assert_parity(their_layer.get_delta_weight("mix"), 8**0.5 * expected[name], msg=name)


def test_cat_and_a_full_rank_svd_are_exact_and_one_adapter_comes_back_unchanged() -> None:
    ours, _ = _pair(MIXED_RANKS)
    add_weighted_adapter(ours, ["t1", "t2"], WEIGHTS, "cat", "cat")
    add_weighted_adapter(ours, ["t1", "t2"], WEIGHTS, "svd", "svd", svd_rank=6)
    add_weighted_adapter(ours, ["t2"], [1.0], "single", "ties", density=0.2)  # one adapter: always linear
    expected = _weighted_sum(ours)
    # The SVD types hold the weights as a float32 tensor (as PEFT's), so their float64 result carries the weights'
    # float32 rounding (about 1e-8 of them): bounded by float32's parity bound.
    for combined, rel in (("cat", None), ("svd", RELATIVE_TOLERANCE[torch.float32])):
        for name, delta in _delta(ours, combined).items():
            assert_parity(delta, expected[name], rel=rel, msg=f"{combined} {name}")
    for name, delta in _delta(ours, "single").items():
        assert_parity(delta, _delta(ours, "t2")[name], msg=name)


def test_svd_types_combine_other_additive_kinds_into_a_lora_and_factor_types_refuse_them() -> None:
    model = build("mlp")
    apply_lora(model, LoraConfig(r=2, target_modules=["lin0", "lin1"]), "t1")
    apply_lora(model, LoHaConfig(r=2, target_modules=["lin0", "lin1"], init_weights=False), "t2")
    randomize_adapters(model)
    add_weighted_adapter(model, ["t1", "t2"], WEIGHTS, "mix", "svd", svd_rank=8)
    assert get_lora_config(model, "mix").kind == "lora"
    expected = _weighted_sum(model)
    for name, delta in _delta(model, "mix").items():
        assert_parity(delta, expected[name], msg=name)
    with pytest.raises(ValueError, match="Adapter 't2' on lin0 is a LoHa adapter: combination_type='linear'"):
        add_weighted_adapter(model, ["t1", "t2"], WEIGHTS, "bad", "linear")


def test_the_result_saves_for_peft_merges_and_leaves_active_and_trainable_adapters_as_they_were(tmp_path: Path) -> None:
    ours, _ = _pair(MIXED_RANKS)
    set_active_adapters(ours, "t1")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    add_weighted_adapter(ours, ["t1", "t2"], WEIGHTS, "mix", "cat")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable  # the new one is frozen
    assert all(
        layer.active_adapters == (["t1"] if "t1" in layer.lora_settings else []) for _, layer in lora_layers(ours)
    )
    save_adapter(ours, tmp_path / "mix", adapter_name="mix")
    set_active_adapters(ours, "mix")
    ids = token_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        reloaded = peft.PeftModel.from_pretrained(_llama64(), tmp_path / "mix")
        assert_parity(reloaded(input_ids=ids).logits, expected, msg="PEFT from our file")
        merge_lora(ours)
        assert_parity(ours(input_ids=ids).logits, expected, msg="merged")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"adapters": ["t1", "zz"]}, r"\['zz'\] unknown"),
        ({"weights": [1.0]}, "2 adapters, 1 weights"),
        ({"adapter_name": "t2"}, "already has an adapter 't2'"),
        ({"combination_type": "ties", "density": None}, r"needs a density in \(0, 1\]"),
        ({"combination_type": "dare_linear", "density": 0.0}, r"needs a density in \(0, 1\]"),
        ({"combination_type": "magnitude_prune", "density": 1.5}, r"needs a density in \(0, 1\]"),
        ({"combination_type": "linear", "configs": MIXED_RANKS}, "adds the factors of equal-rank adapters"),
        ({"combination_type": "mean"}, "combination_type must be one of"),
        (
            {"combination_type": "cat", "configs": {n: LoraConfig(r=10, target_modules=TARGETS) for n in ("t1", "t2")}},
            "'cat' gives rank 20 .* more than model.layers.0.self_attn.v_proj can hold \\(16\\)",
        ),
        (
            {"configs": {**EQUAL_RANKS, "t2": LoraConfig(r=4, target_modules=TARGETS, use_dora=True)}},
            "is a DoRA adapter",
        ),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(arguments: dict, message: str) -> None:
    ours, _ = _pair(arguments.pop("configs", EQUAL_RANKS))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    call = {"adapters": ["t1", "t2"], "weights": WEIGHTS, "adapter_name": "mix", "combination_type": "svd", **arguments}
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(ours, **call)
    assert adapter_names(ours) == ["t1", "t2"]
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_conv_layer_combines_with_its_kernel_shapes() -> None:
    model = build("conv2d")
    for name, r in (("t1", 2), ("t2", 3)):
        apply_lora(model, LoraConfig(r=r, target_modules=["conv", "pointwise"]), name)
    randomize_adapters(model)
    add_weighted_adapter(model, ["t1", "t2"], WEIGHTS, "mix", "svd", svd_rank=5)
    expected = _weighted_sum(model)
    for name, delta in _delta(model, "mix").items():
        assert_parity(delta, expected[name], msg=name)
    set_active_adapters(model, "mix")
    assert model(model_input("conv2d")).isfinite().all()

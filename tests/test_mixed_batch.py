"""Mixed-adapter batches: one forward in which each sample uses its own adapter (or none)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from kind_cases import CASE_MODEL_PAIRS, KIND_CASES, MODELS, build, randomized, targets
from lightning_models import trainer_arguments
from models import randomize_adapters, tiny_llama, token_batch
from numerics import assert_parity
from peft_oracle import copy_adapter_into_peft, peft_twin
from torch import nn
from torch.utils.data import DataLoader

from lightning_lora.core.composition.mixed_batch import BASE_MODEL, mixed_adapter_batch
from lightning_lora.core.config.lora_config import LoraConfig
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layers.adapted_layer import lora_layers
from lightning_lora.core.layers.adapter_set import set_active_adapters
from lightning_lora.core.surgery.inject import apply_lora
from lightning_lora.core.surgery.merge import disable_adapters, merge_lora

NAMES = ["a", "b", "b", BASE_MODEL, "c", "a"]  # a contiguous group, a scattered one, single samples and the base


def _three_adapter_model(case_name: str, model_name: str) -> nn.Module:
    """Adapters a, b, c of the case's kind; a layer holds one rotation, so OFT and BOFT cases add b and c as LoRA."""
    case = KIND_CASES[case_name]
    model = build(model_name)
    for name in ("a", "b", "c"):
        one_per_layer = name != "a" and kind_of(case.config(targets(model_name))).action == "transform"
        apply_lora(model, (KIND_CASES["lora"] if one_per_layer else case).config(targets(model_name)), name)
    return randomized(model).eval()


def _batch(model_name: str, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (size, *MODELS[model_name][2][1:])
    if model_name == "embedding":
        return torch.randint(0, 30, shape, generator=generator)
    return torch.randn(shape, generator=generator)


def _alone(model: nn.Module, inputs: torch.Tensor, names: list[str], call=lambda m, x: m(x)) -> torch.Tensor:
    """Each sample run by itself with only its adapter active (the reference)."""
    before = [list(layer.active_adapters) for _, layer in lora_layers(model)]
    outputs = []
    for index, name in enumerate(names):
        set_active_adapters(model, [] if name == BASE_MODEL else [name])
        outputs.append(call(model, inputs[index : index + 1]))
    for (_, layer), active in zip(lora_layers(model), before):
        layer.active_adapters = active
    return torch.cat(outputs)


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    active = [list(layer.active_adapters) for _, layer in lora_layers(model)]
    return {k: v.clone() for k, v in model.state_dict().items()}, active


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], list[list[str]]]) -> None:
    state, active = snapshot
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert [list(layer.active_adapters) for _, layer in lora_layers(model)] == active
    assert all("forward_plan" not in layer.__dict__ for _, layer in lora_layers(model))


@pytest.mark.parametrize("case_name,model_name", CASE_MODEL_PAIRS, ids=[f"{c}-{m}" for c, m in CASE_MODEL_PAIRS])
def test_mixed_batch_equals_each_sample_alone(case_name: str, model_name: str) -> None:
    model = _three_adapter_model(case_name, model_name)
    inputs = _batch(model_name, len(NAMES))
    with torch.no_grad():
        with mixed_adapter_batch(model, NAMES):
            mixed = model(inputs)
        expected = _alone(model, inputs, NAMES)
    assert_parity(mixed, expected)
    assert not torch.allclose(mixed[0], mixed[1])  # the adapters differ: the test can see a wrong assignment


def _two_lora_llama(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module, list[LoraConfig]]:
    base = tiny_llama().to(dtype)
    configs = [
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, alpha=3, target_modules=["v_proj", "o_proj", "embed_tokens"]),
    ]
    model = apply_lora(copy.deepcopy(base), configs[0], "first")
    apply_lora(model, configs[1], "second")
    randomize_adapters(model)
    return base, model, configs


def test_mixed_batch_equals_peft_adapter_names_forward() -> None:
    import peft

    base, model, configs = _two_lora_llama(torch.float64)  # float64: ours and PEFT's agree to float64 rounding
    theirs = peft_twin(base, configs[0], "first")
    second = configs[1]
    theirs.add_adapter(
        "second", peft.LoraConfig(r=second.r, lora_alpha=second.alpha, target_modules=second.target_modules)
    )
    copy_adapter_into_peft(model, theirs, "first")
    copy_adapter_into_peft(model, theirs, "second")
    theirs.eval()
    tokens = token_batch(batch=5)
    names = ["second", "first", BASE_MODEL, "first", "second"]
    with torch.no_grad(), mixed_adapter_batch(model, names):
        ours = model(tokens).logits
    with torch.no_grad():
        expected = theirs(input_ids=tokens, adapter_names=names).logits
    assert ours.dtype == expected.dtype == torch.float64
    assert_parity(ours, expected)


def test_generate_with_a_mixed_batch_equals_each_prompt_alone() -> None:
    _, model, _ = _two_lora_llama()
    prompts = token_batch(batch=3, length=6)
    names = ["first", BASE_MODEL, "second"]
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with mixed_adapter_batch(model, names):
            mixed = model.generate(prompts, **options)
        alone = _alone(model, prompts, names, call=lambda m, x: m.generate(x, **options))
    assert torch.equal(mixed, alone)


class MixedPredictor(L.LightningModule):
    """The predict-step pattern: the batch carries one adapter name per sample."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with mixed_adapter_batch(self, batch["adapter_names"]):
            return self.model(batch["input_ids"]).logits


def test_trainer_predict_runs_mixed_batches() -> None:
    _, model, _ = _two_lora_llama()
    tokens = token_batch(batch=6)
    names = ["first", "second", BASE_MODEL, "second", "first", "first"]
    samples = [{"input_ids": tokens[i], "adapter_names": name} for i, name in enumerate(names)]
    loader = DataLoader(samples, batch_size=3)  # default collate: a list of names per batch
    predictions = L.Trainer(**trainer_arguments()).predict(MixedPredictor(model), loader)
    with torch.no_grad():
        expected = _alone(model, tokens, names, call=lambda m, x: m(x).logits)
    assert_parity(torch.cat(predictions), expected)


def test_training_gives_each_adapter_the_gradients_of_its_own_samples() -> None:
    model = _three_adapter_model("lora", "mlp").train()
    inputs = _batch("mlp", len(NAMES))
    weights = torch.randn(len(NAMES), 2, generator=torch.Generator().manual_seed(5))
    with mixed_adapter_batch(model, NAMES):
        (model(inputs) * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for index, name in enumerate(NAMES):  # the sum over samples run alone (the base sample gives none)
        if name != BASE_MODEL:
            set_active_adapters(model, [name])
            (model(inputs[index : index + 1]) * weights[index]).sum().backward()
    for key, grad in mixed.items():
        assert_parity(grad, dict(model.named_parameters())[key].grad, msg=key)


def test_disable_adapters_takes_precedence_over_a_mixed_batch() -> None:
    _, model, _ = _two_lora_llama()
    tokens = token_batch(batch=2)
    with torch.no_grad(), disable_adapters(model):
        base = model(tokens).logits
        with mixed_adapter_batch(model, ["first", "second"]):
            assert_parity(model(tokens).logits, base)


def test_unknown_adapter_name_is_refused_and_nothing_changes() -> None:
    _, model, _ = _two_lora_llama()
    snapshot = _snapshot(model)
    unknown = r"unknown adapter name\(s\) \['thrid'\]; the model has \["
    with pytest.raises(ValueError, match=unknown), mixed_adapter_batch(model, ["first", "thrid"]):
        pytest.fail("the context must not be entered")
    _assert_unchanged(model, snapshot)


def test_wrong_number_of_names_is_refused_in_the_forward() -> None:
    _, model, _ = _two_lora_llama()
    tokens = token_batch(batch=3)
    snapshot = _snapshot(model)
    with torch.no_grad():
        before = model(tokens).logits
        wrong_length = "received a batch of 3 samples.*but 2 adapter names"
        with pytest.raises(ValueError, match=wrong_length), mixed_adapter_batch(model, ["first", "second"]):
            model(tokens)
        _assert_unchanged(model, snapshot)
        assert_parity(model(tokens).logits, before)


def test_merged_adapters_are_refused() -> None:
    _, model, _ = _two_lora_llama()
    merge_lora(model, adapter_names=["first"])
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_lora\(model\)"), mixed_adapter_batch(model, ["first"]):
        pass
    _assert_unchanged(model, snapshot)


def test_merging_inside_a_mixed_batch_is_refused_before_anything_changes() -> None:
    _, model, _ = _two_lora_llama()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad(), mixed_adapter_batch(model, ["first", BASE_MODEL]):
        with pytest.raises(ValueError, match=r"computes through a mixed-adapter batch"):
            merge_lora(model, adapter_names=["second"])
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not any(layer.merged_adapters for _, layer in lora_layers(model))


@pytest.mark.parametrize(
    "names,error,match",
    [
        ("first", TypeError, "one name per sample"),
        (["first", None], TypeError, "use '__base__'"),
        ([], ValueError, "adapter_names is empty"),
    ],
)
def test_malformed_names_are_refused(names, error: type[Exception], match: str) -> None:
    _, model, _ = _two_lora_llama()
    with pytest.raises(error, match=match), mixed_adapter_batch(model, names):
        pass
    assert all("forward_plan" not in layer.__dict__ for _, layer in lora_layers(model))


def test_nested_mixed_batches_are_refused() -> None:
    _, model, _ = _two_lora_llama()
    with mixed_adapter_batch(model, ["first"]):
        with pytest.raises(ValueError, match="already computes through a mixed-adapter batch.*one mixed batch"), \
                mixed_adapter_batch(model, ["second"]):
            pass
        assert all(layer.forward_plan is not None for _, layer in lora_layers(model))
    assert all("forward_plan" not in layer.__dict__ for _, layer in lora_layers(model))

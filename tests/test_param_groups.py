"""Optimizer parameter groups: LoRA+ learning rates, weight decay by tensor kind, LoRA-FA."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from peft_oracle import peft_key, peft_twin

from lightning_lora import LoraConfig, adapter_state_dict, apply_lora, freeze_lora_A, lora_param_groups

LR, RATIO, EMBEDDING_LR, DECAY = 1e-3, 16.0, 5e-5, 0.1


def _llama(**config: object) -> torch.nn.Module:
    values: dict = {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    return apply_lora(tiny_llama(), LoraConfig(**{**values, **config}))


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): group for group in groups for p in group["params"]}


def test_loraplus_groups_give_each_tensor_kind_its_learning_rate_and_decay() -> None:
    model = _llama(use_dora=True, modules_to_save=["lm_head"], bias="all", target_modules=["q_proj", "v_proj"])
    model.model.norm.weight.requires_grad_(True)  # a trainable norm: no weight decay
    groups = lora_param_groups(model, lr=LR, loraplus_lr_ratio=RATIO, weight_decay=DECAY)
    group_of = _group_of(groups)
    layer = model.model.layers[0].self_attn.q_proj
    expected = {
        layer.lora_A["default"]: ("lora_A", LR, DECAY),
        layer.lora_B["default"]: ("lora_B", LR * RATIO, DECAY),
        layer.lora_magnitude["default"]: ("lora_magnitude", LR * RATIO, 0.0),
        model.lm_head.weight: ("decay", LR, DECAY),
        model.model.norm.weight: ("no_decay", LR, 0.0),
    }
    for parameter, (name, lr, decay) in expected.items():
        group = group_of[id(parameter)]
        assert (group["name"], group["lr"], group["weight_decay"]) == (name, lr, decay)


def test_loraplus_learning_rates_match_peft() -> None:
    import peft
    from peft.optimizers import create_loraplus_optimizer

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    base = tiny_llama()
    ours = apply_lora(tiny_llama(), config)
    theirs = peft_twin(base, config)
    assert isinstance(theirs, peft.PeftModel)
    their_optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=EMBEDDING_LR
    )
    their_lr = {id(p): g["lr"] for g in their_optimizer.param_groups for p in g["params"]}
    their_parameters = dict(theirs.named_parameters())
    our_group = _group_of(lora_param_groups(ours, LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=EMBEDDING_LR))
    adapter = adapter_state_dict(ours)
    our_parameters = dict(ours.named_parameters())
    for key in adapter:
        their_parameter = their_parameters[peft_key(key, "default", their_parameters)]
        assert our_group[id(our_parameters[key])]["lr"] == their_lr[id(their_parameter)], key
    assert {g["lr"] for g in their_optimizer.param_groups if g["params"]} == {LR, LR * RATIO, EMBEDDING_LR}


def test_embedding_adapters_default_to_the_loraplus_reference_learning_rate() -> None:
    model = _llama()
    groups = {g["name"]: g for g in lora_param_groups(model, lr=LR, loraplus_lr_ratio=RATIO)}
    assert groups["lora_embedding"]["lr"] == 1e-6
    assert model.model.embed_tokens.lora_A["default"] in groups["lora_embedding"]["params"]


def test_without_loraplus_every_group_trains_at_lr() -> None:
    model = _llama()
    assert {g["lr"] for g in lora_param_groups(model, lr=LR)} == {LR}


def test_groups_hold_every_trainable_parameter_once_and_no_frozen_one() -> None:
    model = _llama(modules_to_save=["lm_head"])
    held = [p for g in lora_param_groups(model, lr=LR, loraplus_lr_ratio=RATIO) for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in trainable}


def test_lora_fa_trains_B_while_A_stays_at_its_init() -> None:
    model = _llama()
    initial = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    optimizer = torch.optim.SGD(lora_param_groups(model, lr=0.1, lora_fa=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.lora_A["default"].requires_grad
    assert model.model.embed_tokens.lora_A["default"].requires_grad  # zero-initialised: freezing it would stall
    tokens = torch.randint(0, 96, (2, 8))
    for _ in range(2):
        model(tokens).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = adapter_state_dict(model)
    a_key = "model.layers.0.self_attn.q_proj.lora_A.default"
    assert torch.equal(after[a_key], initial[a_key])
    assert not torch.equal(after[a_key.replace("lora_A", "lora_B")], initial[a_key.replace("lora_A", "lora_B")])


def test_freeze_lora_A_of_an_unknown_adapter_raises() -> None:
    with pytest.raises(ValueError, match="no adapter"):
        freeze_lora_A(_llama(), "other")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": 0.0}, "lr must be"),
        ({"lr": LR, "loraplus_lr_ratio": -1.0}, "loraplus_lr_ratio must be"),
        ({"lr": LR, "loraplus_lr_embedding": 1e-6}, "set loraplus_lr_ratio"),
        ({"lr": LR, "weight_decay": -0.1}, "weight_decay must be"),
    ],
)
def test_invalid_arguments_raise(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lora_param_groups(_llama(), **arguments)


def test_model_without_trainable_parameters_raises() -> None:
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="apply_lora"):
        lora_param_groups(model, lr=LR)

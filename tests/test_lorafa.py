"""The LoRA-FA optimizer: B's projected AdamW step equals PEFT's ``create_lorafa_optimizer``, A never moves, what it
refuses, exact state round trips and an exact Lightning resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BuiltInInit, TinyNet, dataloader, lora_config, trainer_arguments
from models import tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity
from peft_oracle import copy_adapter_into_peft, peft_key, peft_twin
from torch import nn

from lightning_lora import (
    LoHaConfig,
    LoraCallback,
    LoraConfig,
    LoraFAOptimizer,
    adapter_state_dict,
    apply_lora,
    lorafa_optimizer,
)

LR, DECAY, STEPS = 1e-2, 0.1, 5

# model factory, LoRA targets, modules_to_save
MODELS: dict[str, tuple[Callable[[], nn.Module], list[str], Optional[list[str]]]] = {
    "llama": (tiny_llama, ["q_proj", "v_proj"], ["lm_head"]),
    "gpt2": (lambda: tiny_gpt2(tied=False), ["c_attn", "c_proj"], None),  # Hugging Face Conv1D layers
}


def _lora_A(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items() if ".lora_A." in k}


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = STEPS) -> None:
    ids = token_batch()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("model_name", "use_rslora", "projection_dtype"),
    [
        ("llama", False, torch.bfloat16),
        ("llama", True, torch.bfloat16),
        ("llama", True, None),
        ("gpt2", False, torch.bfloat16),
    ],
)
def test_B_outputs_and_saved_modules_equal_peft_lorafa_after_several_steps(
    model_name: str, use_rslora: bool, projection_dtype: Optional[torch.dtype], monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft.optimizers.lorafa as peft_lorafa
    from peft.optimizers import create_lorafa_optimizer

    # PEFT projects under bf16 autocast wherever bf16 is available (it is on CPUs); without it, in full precision.
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: projection_dtype is not None)
    build, targets, saved = MODELS[model_name]
    config = LoraConfig(
        r=4, alpha=8, target_modules=targets, modules_to_save=saved, use_rslora=use_rslora,
        alpha_pattern={targets[1]: 16},  # a per-layer scaling
    )
    ours = apply_lora(build(), config)
    theirs = peft_twin(build(), config)
    copy_adapter_into_peft(ours, theirs)
    initial_A = _lora_A(ours)

    our_optimizer = lorafa_optimizer(ours, lr=LR, weight_decay=DECAY, projection_dtype=projection_dtype)
    their_optimizer = create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=LR, weight_decay=DECAY)
    _train_steps(ours, our_optimizer)
    _train_steps(theirs, their_optimizer)

    their_state = theirs.state_dict()
    for key, value in adapter_state_dict(ours).items():
        if ".lora_" in key:
            assert_parity(value, their_state[peft_key(key, "default", their_state)], msg=key)
    assert max(v.abs().max().item() for k, v in adapter_state_dict(ours).items() if ".lora_B." in k) > 1e-2
    if saved:
        their_head = theirs.base_model.model.lm_head.modules_to_save["default"].weight
        assert_parity(ours.lm_head.weight, their_head, msg="lm_head")
    ids = token_batch(seed=5)
    with torch.no_grad():
        assert_parity(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, msg="logits")
    assert all(torch.equal(value, initial_A[key]) for key, value in _lora_A(ours).items())


def _tiny(**config: Any) -> nn.Module:
    torch.manual_seed(0)
    return apply_lora(TinyNet(), lora_config(**config))


def _regression_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for x, y in list(dataloader())[:steps]:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_A_is_frozen_and_never_changes_while_B_and_saved_modules_train() -> None:
    model = _tiny()
    before = copy.deepcopy(model.state_dict())
    optimizer = lorafa_optimizer(model, lr=LR)
    assert not model.fc1.lora_A["default"].requires_grad and model.fc1.lora_B["default"].requires_grad
    _regression_steps(model, optimizer, steps=3)
    after = model.state_dict()
    for key in ("fc1.lora_A.default", "fc2.lora_A.default", "fc1.weight"):
        assert torch.equal(after[key], before[key]), key
    for key in ("fc1.lora_B.default", "fc2.lora_B.default", "head.weight", "head.bias"):
        assert not torch.equal(after[key], before[key]), key


def test_groups_pair_each_B_with_its_A_and_put_other_trainable_tensors_in_a_plain_group() -> None:
    model = _tiny(alpha_pattern={"fc2": 16})
    optimizer = lorafa_optimizer(model, lr=LR)
    lora_group, other_group = optimizer.param_groups
    assert lora_group["name"] == "lora_B" and other_group["name"] == "other"
    assert lora_group["params"] == [model.fc1.lora_B["default"], model.fc2.lora_B["default"]]
    assert lora_group["scaling"] == [2.0, 4.0]
    assert "lora_A" not in lora_group  # A is referenced by the optimizer, never saved in its state dict
    assert other_group["params"] == [model.head.weight, model.head.bias]
    assert (lora_group["eps"], lora_group["betas"], lora_group["correct_bias"]) == (1e-6, (0.9, 0.999), True)


def test_state_dict_round_trip_resumes_exactly() -> None:
    model = _tiny()
    optimizer = lorafa_optimizer(model, lr=LR, weight_decay=DECAY)
    _regression_steps(model, optimizer, steps=2)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _regression_steps(model, optimizer, steps=2)

    resumed = _tiny()
    resumed_optimizer = lorafa_optimizer(resumed, lr=LR, weight_decay=DECAY)
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert all(isinstance(s["step"], int) for s in resumed_optimizer.state.values())
    _regression_steps(resumed, resumed_optimizer, steps=2)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in model.state_dict().items())


def test_only_the_named_adapter_is_trained_lorafa_style() -> None:
    model = _tiny()
    apply_lora(model, lora_config(modules_to_save=None), adapter_name="second")
    optimizer = lorafa_optimizer(model, lr=LR, adapter_name="second")
    lora_group, other_group = optimizer.param_groups
    assert lora_group["params"] == [model.fc1.lora_B["second"], model.fc2.lora_B["second"]]
    assert not model.fc1.lora_A["second"].requires_grad
    assert model.fc1.lora_A["default"].requires_grad and model.fc1.lora_A["default"] in other_group["params"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lora_config(use_dora=True), "Adapter 'default' on fc1 is DoRA"),
        (LoHaConfig(r=2, target_modules=["fc1"]), "Adapter 'default' on fc1 is LoHa"),
    ],
)
def test_other_kinds_are_refused_by_name_and_the_model_is_left_as_it_was(config: Any, message: str) -> None:
    torch.manual_seed(0)
    model = apply_lora(TinyNet(), config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=message) as error:
        lorafa_optimizer(model, lr=LR)
    assert "lora_param_groups(model, lr, lora_fa=True)" in str(error.value)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == trainable


class EmbeddingAndConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.proj = nn.Linear(8, 8)


@pytest.mark.parametrize(("target", "message"), [("embed", "embed is a Embedding"), ("conv", "conv is a Conv1d")])
def test_embedding_and_convolution_adapters_are_refused_by_name(target: str, message: str) -> None:
    model = apply_lora(EmbeddingAndConvNet(), LoraConfig(r=2, target_modules=[target, "proj"]))
    with pytest.raises(ValueError, match=message) as error:
        lorafa_optimizer(model, lr=LR)
    assert f"exclude_modules=['{target}']" in str(error.value)


def test_model_without_adapters_is_refused() -> None:
    with pytest.raises(ValueError, match="The model has no adapter .*apply_lora"):
        lorafa_optimizer(TinyNet(), lr=LR)


def test_unknown_adapter_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no adapter 'other' \(it has \['default'\]\)"):
        lorafa_optimizer(_tiny(), lr=LR, adapter_name="other")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"lr": -1.0}, "learning rate"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1.0}, "eps"),
     ({"weight_decay": -0.1}, "weight_decay")],
)
def test_invalid_hyperparameters_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraFAOptimizer([nn.Parameter(torch.zeros(2))], **arguments)


class LoraFAModule(BuiltInInit):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return lorafa_optimizer(self, lr=self.lr, weight_decay=DECAY)


def _fit(module: L.LightningModule, epochs: int, checkpoint_dir: Optional[Path] = None, **fit: Any) -> None:
    callbacks: list = [LoraCallback(lora_config(), lora_fa=True)]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="last"))
    arguments = trainer_arguments(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None)
    L.Trainer(**arguments).fit(module, dataloader(), **fit)


def test_lightning_training_keeps_A_trains_B_and_resumes_bitwise(tmp_path: Path) -> None:
    L.seed_everything(0)
    uninterrupted = LoraFAModule()
    LoraCallback(lora_config(), lora_fa=True).inject(uninterrupted)
    initial = {k: v.clone() for k, v in adapter_state_dict(uninterrupted).items()}
    L.seed_everything(0)
    _fit(uninterrupted, epochs=2)
    final = adapter_state_dict(uninterrupted)
    assert torch.equal(final["model.fc1.lora_A.default"], initial["model.fc1.lora_A.default"])
    assert not torch.equal(final["model.fc1.lora_B.default"], initial["model.fc1.lora_B.default"])

    L.seed_everything(0)
    _fit(LoraFAModule(), epochs=1, checkpoint_dir=tmp_path)
    L.seed_everything(0)
    resumed = LoraFAModule()
    _fit(resumed, epochs=2, ckpt_path=tmp_path / "last.ckpt")
    resumed_state = adapter_state_dict(resumed)
    assert resumed_state.keys() == final.keys()
    assert all(torch.equal(resumed_state[k], final[k]) for k in final)

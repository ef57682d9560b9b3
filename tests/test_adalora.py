"""AdaLoRA: the rank allocator against PEFT's on the same gradients, the orthogonality penalty, PEFT files with a
final rank pattern both ways, the Lightning schedule (ranks logged, heatmap, exact resume) and its bad input.

The kind's forward, gradients, merge and files without a pattern are in the kinds table (tests/kind_cases.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from kind_cases import MLP, Conv2dNet
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import BuiltInInit, dataloader, trainer_arguments
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    AdaLoraConfig,
    AdaLoraSchedule,
    LoraCallback,
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    save_adapter,
)
from lightning_lora.core.training.rank_allocation import RankAllocator, orthogonality_penalty

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=2, total_step=14, beta1=0.8, beta2=0.9)
PEFT_SCHEDULE = {**{k: v for k, v in SCHEDULE.items() if k != "delta_t"}, "deltaT": 2}


# network: (builder, adapted layers, input shape, target shape); "conv2d" adapts a 3x3 and a 1x1 nn.Conv2d
NETWORKS = {
    "mlp": (MLP, ["lin0", "lin1"], (8, 12), (8, 2)),
    "conv2d": (Conv2dNet, ["conv", "pointwise"], (8, 4, 6, 6), (8, 4)),
}


class LossOutput(nn.Module):
    """A network whose forward returns an object with ``.loss``, so PEFT's AdaLoRA adds its orthogonality penalty."""

    def __init__(self, network: str = "mlp") -> None:
        super().__init__()
        self.net = NETWORKS[network][0]()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=nn.functional.mse_loss(self.net(x), y))


def _pair(orth_reg_weight: float = 0.0, network: str = "mlp") -> tuple[nn.Module, nn.Module]:
    """PEFT's AdaLoRA model and ours with the same (random, non-zero) tensors."""
    torch.manual_seed(0)
    base, targets = LossOutput(network), NETWORKS[network][1]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        target_modules=targets, init_lora_weights=False, orth_reg_weight=orth_reg_weight, **PEFT_SCHEDULE))
    ours = apply_lora(base, AdaLoraConfig(target_modules=targets, orth_reg_weight=orth_reg_weight, **SCHEDULE))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            their_layer = theirs.base_model.model.get_submodule(name)
            for factor in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, factor)["default"].copy_(getattr(their_layer, factor)["default"])
    return theirs, ours


def _data(step: int, network: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    *_, x_shape, y_shape = NETWORKS[network]
    return torch.randn(x_shape, generator=generator), torch.randn(y_shape, generator=generator)


@pytest.mark.parametrize("network", list(NETWORKS))
def test_rank_allocator_takes_peft_decisions_at_every_step_on_the_same_gradients(network: str) -> None:
    theirs, ours = _pair(network=network)
    allocator = RankAllocator(lora_layers(ours), "default", lora_layers(ours)[0][1].lora_settings["default"].config, 14)
    their_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in their_params.items()}
    our_named = dict(ours.named_parameters())
    optimizer = torch.optim.Adam(their_params.values(), lr=0.05)
    allocations = 0
    for step in range(14):
        optimizer.zero_grad()
        theirs(*_data(step, network)).loss.backward()
        optimizer.step()
        with torch.no_grad():  # ours gets PEFT's stepped values and the same gradients
            for name, parameter in our_params.items():
                mine = our_named[f"{name}.default"]
                mine.copy_(parameter)
                mine.grad = parameter.grad.clone()
        theirs.base_model.update_and_allocate(step)
        pattern = allocator.step(step)
        allocations += pattern is not None
        for name, layer in lora_layers(ours):
            their_E = theirs.base_model.model.get_submodule(name).lora_E["default"]
            assert torch.equal(layer.lora_E["default"], their_E), (step, name)
    their_pattern = {k.replace(".lora_E.default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert allocator.final_pattern == their_pattern
    assert allocations == 5  # steps 4, 6, 8, 10 (every delta_t=2 after tinit=2) and the final one at 14 - 3
    assert sum(allocator.ranks().values()) == 2 * 2  # target_r per layer on average


def test_the_orthogonality_penalty_equals_peft_s() -> None:
    theirs, ours = (model.double() for model in _pair(orth_reg_weight=0.3))  # float64: the difference cancels
    x, y = (t.double() for t in _data(0))
    with_penalty = theirs.base_model(x, y).loss  # AdaLoraModel.forward adds the penalty
    plain = nn.functional.mse_loss(theirs.base_model.model.net(x), y)
    assert with_penalty.dtype == torch.float64
    assert_parity(with_penalty - plain, 0.3 * orthogonality_penalty(lora_layers(ours), "default"))


def _peft_trained_to_its_final_pattern(tmp_path: Path, network: str = "mlp") -> tuple[nn.Module, Path]:
    theirs, _ = _pair(network=network)
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    for step in range(14):
        optimizer.zero_grad()
        theirs(*_data(step, network)).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
    theirs.save_pretrained(tmp_path / "peft")
    return theirs, tmp_path / "peft"


@pytest.mark.parametrize("network", list(NETWORKS))
def test_a_peft_adalora_file_with_its_final_rank_pattern_loads_with_peft_outputs(tmp_path: Path, network: str) -> None:
    theirs, directory = _peft_trained_to_its_final_pattern(tmp_path, network)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert sum(sum(kept) for kept in config["rank_pattern"].values()) == 4
    torch.manual_seed(0)
    ours = load_adapter(LossOutput(network).double(), directory)  # compared in float64, to float64 rounding
    theirs = theirs.double()
    x, y = (t.double() for t in _data(99, network))
    expected = theirs(x, y).loss
    assert expected.dtype == torch.float64
    assert_parity(ours(x, y).loss, expected)
    # and back: our export writes the same surviving ranks and pattern
    save_adapter(ours, tmp_path / "again", format="peft")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == config["rank_pattern"]
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(LossOutput(network).double(), tmp_path / "again")
    assert_parity(reloaded(x, y).loss, expected)


# ----- the Lightning schedule -----
def _config(**overrides) -> AdaLoraConfig:
    values = dict(init_r=4, target_r=2, alpha=8, target_modules=["fc1", "fc2"], tinit=1, tfinal=2, delta_t=1)
    return AdaLoraConfig(**{**values, **overrides})


class Probe(L.Callback):
    """Records every adapter gradient the optimizer is about to use."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _fit(tmp_path: Path, config: AdaLoraConfig, **trainer_overrides) -> tuple[L.LightningModule, L.Trainer]:
    """Fit BuiltInInit with the adapter and the schedule: 4 steps per epoch, 2 epochs unless told otherwise."""
    L.seed_everything(0)
    module = BuiltInInit()
    ckpt_path = trainer_overrides.pop("ckpt_path", None)
    trainer_overrides.setdefault("callbacks", [])
    trainer_overrides["callbacks"] = [LoraCallback(config), AdaLoraSchedule(), *trainer_overrides["callbacks"]]
    trainer_overrides.setdefault("max_epochs", 2)
    trainer = L.Trainer(**trainer_arguments(default_root_dir=tmp_path, **trainer_overrides))
    trainer.fit(module, dataloader(samples=16, batch_size=4), ckpt_path=ckpt_path)
    return module, trainer


def test_the_schedule_prunes_to_the_target_budget_logs_ranks_and_draws_the_allocation(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    module, trainer = _fit(tmp_path, _config(), logger=logger, log_every_n_steps=1)
    ranks = {name: int((layer.lora_E["default"] != 0).sum()) for name, layer in lora_layers(module)}
    assert sum(ranks.values()) == 4 and set(ranks) == {"model.fc1", "model.fc2"}
    assert module.model.fc1.lora_settings["default"].config.rank_pattern is not None
    metrics = trainer.logged_metrics
    assert metrics["adalora/budget"] == 4 and metrics["adalora/rank/model.fc1"] == ranks["model.fc1"]
    assert "adalora/orthogonality" in metrics
    written = json.loads((Path(trainer.log_dir) / "adalora_ranks.json").read_text())
    assert written["ranks"] == ranks
    pytest.importorskip("matplotlib")
    assert (Path(trainer.log_dir) / "adalora_ranks.png").stat().st_size > 1000


def test_the_penalty_gradient_is_added_without_editing_the_loss(tmp_path: Path) -> None:
    probe = Probe()
    module, _ = _fit(tmp_path, _config(orth_reg_weight=0.7, total_step=8), max_steps=1, callbacks=[probe])
    # Recompute step 0's gradient by hand: the same batch, loss + 0.7 * penalty, from the initial adapter.
    L.seed_everything(0)
    fresh = BuiltInInit()
    trainer = L.Trainer(**trainer_arguments(max_steps=0, callbacks=[LoraCallback(_config(orth_reg_weight=0.7, total_step=8))]))
    trainer.fit(fresh, dataloader(samples=16, batch_size=4))
    x, y = next(iter(dataloader(samples=16, batch_size=4)))
    loss = nn.functional.mse_loss(fresh.model(x), y) + 0.7 * orthogonality_penalty(lora_layers(fresh), "default")
    loss.backward()
    for name, grad in probe.grads[0].items():
        assert_parity(grad, dict(fresh.named_parameters())[name].grad, msg=name)


@pytest.mark.parametrize("tfinal", [0, 2], ids=["scores-live-at-the-end", "allocation-final-after-resume"])
def test_resume_continues_the_schedule_exactly(tmp_path: Path, tfinal: int) -> None:
    # The stopped run ends after its first epoch, step 4 of 8 (standing in for a kill); total_step keeps its
    # schedule the 8-step one, which re-allocates at steps 2-5 (and with tfinal=2 finalises at 6).
    config = lambda: _config(total_step=8, tfinal=tfinal)  # noqa: E731
    uninterrupted, first = _fit(tmp_path / "a", config())
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", config(), max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True)
    resumed, second = _fit(tmp_path / "c", config(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.global_step == 8
    for key, value in adapter_state_dict(uninterrupted).items():
        assert torch.equal(adapter_state_dict(resumed)[key], value), key
    states = [next(c for c in t.callbacks if isinstance(c, AdaLoraSchedule)).state_dict() for t in (first, second)]
    assert states[0]["rank_pattern"] == states[1]["rank_pattern"] and (states[0]["rank_pattern"] is None) == (tfinal == 0)
    scores = [state["allocator"]["scores"] for state in states]
    assert scores[0].keys() == scores[1].keys() and bool(scores[0]) == (tfinal == 0)
    for key, entry in scores[0].items():
        assert all(torch.equal(value, scores[1][key][name]) for name, value in entry.items()), key


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AdaLoraConfig(init_r=4, target_r=6), "target_r=6 is larger than init_r=4"),
        (lambda: AdaLoraConfig(tinit=5, tfinal=5, total_step=10), "leaves no steps to re-allocate"),
        (lambda: AdaLoraConfig(beta1=1.0), "beta1 must be in"),
        (lambda: AdaLoraConfig(rank_pattern={"fc1": [True]}, init_r=2, target_r=1), "must hold init_r=2 booleans"),
    ],
)
def test_bad_configs_are_refused_with_the_fix(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_a_schedule_the_run_cannot_hold_fails_before_any_training_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tinit=6 >= total_step"):
        _fit(tmp_path, _config(tinit=6))  # 8 steps estimated by the Trainer
    L.seed_everything(0)
    module = BuiltInInit()
    trainer = L.Trainer(**trainer_arguments(max_steps=4, callbacks=[LoraCallback(LoraConfig(r=2, target_modules=["fc1"])),
                                                                    AdaLoraSchedule()]))
    before = copy.deepcopy(module.model.fc1.weight)
    with pytest.raises(ValueError, match="works on AdaLoRA adapters .*; adapter 'default' is a LoRA adapter"):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0 and torch.equal(module.model.fc1.weight, before)
    trainer = L.Trainer(**trainer_arguments(max_steps=4, callbacks=[AdaLoraSchedule("other")]))
    with pytest.raises(ValueError, match="acts on adapter 'other', but the model has no adapters"):
        trainer.fit(BuiltInInit(), dataloader())


def test_a_rank_above_what_a_layer_holds_is_accepted_as_peft_does_and_said_once_per_layer() -> None:
    """PEFT's default init_r=12 on its 10-wide test MLP: accepted, the unusable ranks named, numbers as PEFT's."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)).double()
    with pytest.warns(UserWarning) as caught:
        ours = apply_lora(copy.deepcopy(base), AdaLoraConfig(init_r=12, target_modules=["0", "2"], total_step=10))
    said = [str(w.message) for w in caught if "AdaLoRA rank" in str(w.message)]
    assert said == [
        "AdaLoRA rank init_r=12 on 0 can use at most 10 ranks; the other 2 add parameters and take rank budget but "
        "nothing the update can express.",
        "AdaLoRA rank init_r=12 on 2 can use at most 2 ranks; the other 10 add parameters and take rank budget but "
        "nothing the update can express.",
    ]
    assert ours[0].lora_A["default"].shape == (12, 10)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        target_modules=["0", "2"], init_r=12, init_lora_weights=False, total_step=10))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            for factor in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, factor)["default"].copy_(getattr(theirs.base_model.model.get_submodule(name), factor)[
                    "default"])
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_parity(ours(x), theirs(x))
    merged = merge_and_unload(copy.deepcopy(ours))
    assert_parity(merged(x), ours(x))


class ConvRegression(BuiltInInit):
    """A 2x2 convolution over the 8 features seen as a 2-channel 2x2 image, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 4, 2), nn.Flatten(), nn.Linear(4, 4))


def test_the_schedule_prunes_a_convolution_and_its_peft_export_loads_in_peft(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = ConvRegression()
    fresh = copy.deepcopy(module.model)
    config = AdaLoraConfig(init_r=4, target_r=2, alpha=8, target_modules=["1", "3"], tinit=1, tfinal=2, delta_t=1)
    trainer = L.Trainer(**trainer_arguments(default_root_dir=tmp_path, max_epochs=2,
                                            callbacks=[LoraCallback(config), AdaLoraSchedule()]))
    trainer.fit(module, dataloader(samples=16, batch_size=4))
    ranks = {name: int((layer.lora_E["default"] != 0).sum()) for name, layer in lora_layers(module)}
    assert set(ranks) == {"model.1", "model.3"} and sum(ranks.values()) == 4
    assert module.model[1].lora_A["default"].shape == (4, 2 * 2 * 2)  # [init_r, in_channels * kernel]
    save_adapter(module.model, tmp_path / "peft", format="peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    kept = {key: sum(kept) for key, kept in pattern.items()}
    assert kept == {"1.lora_E": ranks["model.1"], "3.lora_E": ranks["model.3"]}
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_parity(peft.PeftModel.from_pretrained(fresh, tmp_path / "peft")(x), module.model.eval()(x))

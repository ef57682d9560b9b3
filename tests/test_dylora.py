"""DyLoRA: nested ranks in the core (forward, merge, PEFT export and truncation at a rank ``b``) and the Lightning
schedule that samples ``b`` every step (logging, the "last" and "nested" updates, exact resume) and its bad input."""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from kind_cases import build, model_input, randomized, targets
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import BuiltInInit, dataloader, lora_config, probe_inputs, trainer_arguments
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    DyLoraSchedule,
    LoHaConfig,
    LoraCallback,
    LoraConfig,
    active_rank,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_param_groups,
    merge_lora,
    save_adapter,
    set_active_rank,
    truncate_adapter,
    unmerge_lora,
)
from lightning_lora.core.kinds.nested_rank import nested_rank_limit

R, ALPHA = 4, 8.0


def _adapted(model_name: str, **config: Any) -> tuple[nn.Module, nn.Module]:
    """(base, a copy with a rank-4 LoRA adapter of random values)."""
    base = build(model_name)
    fields = {"r": R, "alpha": ALPHA, "target_modules": targets(model_name), **config}
    return base, randomized(apply_lora(copy.deepcopy(base), LoraConfig(**fields)))


def _rank_b_copy(base: nn.Module, model: nn.Module, b: int, **config: Any) -> nn.Module:
    """A fresh rank-``b`` LoRA (same alpha) holding the first ``b`` rows of A and columns of B of ``model``."""
    names = [name for name, _ in lora_layers(model)]
    fields = {"r": b, "alpha": ALPHA, "target_modules": names, **config}
    built = apply_lora(copy.deepcopy(base), LoraConfig(**fields))
    with torch.no_grad():
        for name, layer in lora_layers(built):
            source = model.get_submodule(name)
            layer.lora_A["default"].copy_(source.lora_A["default"][:b])
            layer.lora_B["default"].copy_(source.lora_B["default"][:, :b])
    return built


# ----- the core: one adapter at every rank -----
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_a_linear_layer_at_rank_b_computes_the_first_b_ranks_with_alpha_over_b(use_rslora: bool) -> None:
    _, model = _adapted("mlp", use_rslora=use_rslora)
    layer, x = model.lin0, torch.randn(5, 12)
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    for b in range(1, R + 1):
        set_active_rank(model, b)
        scaling = ALPHA / math.sqrt(b) if use_rslora else ALPHA / b  # the official code's sqrt(r/b)**2 * alpha/r
        expected = nn.functional.linear(x, layer.weight, layer.bias) + scaling * x @ A[:b].T @ B[:, :b].T
        assert_parity(layer(x), expected)
    set_active_rank(model, None)
    assert_parity(layer(x), nn.functional.linear(x, layer.weight, layer.bias) + ALPHA / (
        math.sqrt(R) if use_rslora else R) * x @ A.T @ B.T)


@pytest.mark.parametrize("model_name", ["mlp", "hf-conv1d", "conv2d", "embedding"])
def test_every_layer_type_at_rank_b_equals_a_rank_b_lora_built_from_the_first_b_ranks(model_name: str) -> None:
    base, model = _adapted(model_name)
    x = model_input(model_name)
    outputs = set()
    for b in range(1, R + 1):
        set_active_rank(model, b)
        assert active_rank(model) == b
        assert_parity(model(x), _rank_b_copy(base, model, b)(x))
        outputs.add(model(x).sum().item())
    assert len(outputs) == R  # each rank really computes something else


def test_merge_at_rank_b_equals_the_forward_and_the_rank_cannot_change_under_a_merge() -> None:
    _, model = _adapted("mlp")
    x = model_input("mlp")
    weights = {name: layer.weight.detach().clone() for name, layer in lora_layers(model)}
    set_active_rank(model, 2)
    expected = model(x)
    merge_lora(model)
    assert_parity(model(x), expected)
    with pytest.raises(ValueError, match="is merged into .* Call unmerge_lora"):
        set_active_rank(model, 3)
    assert active_rank(model) == 2
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        assert_parity(layer.weight, weights[name])
    assert_parity(model(x), expected)


@pytest.mark.parametrize("model_name", ["mlp", "hf-conv1d", "embedding"])
def test_a_truncated_adapter_saves_as_a_plain_rank_b_lora_that_peft_loads_with_the_same_outputs(
    model_name: str, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    base, model = _adapted(model_name)
    x = model_input(model_name)
    set_active_rank(model, 2)
    expected = model(x)
    save_adapter(model, tmp_path / "at-rank", format="peft")  # exporting at an active rank writes that rank
    truncate_adapter(model, 2)
    assert active_rank(model) is None and nested_rank_limit(model) == 2
    assert all(layer.lora_A["default"].shape[0] == 2 and layer.lora_B["default"].shape[1] == 2
               for _, layer in lora_layers(model))
    assert_parity(model(x), expected)
    save_adapter(model, tmp_path / "truncated", format="peft")
    written = json.loads((tmp_path / "truncated" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"]) == (2, ALPHA, {})
    assert json.loads((tmp_path / "at-rank" / "adapter_config.json").read_text()) == written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out warning on Conv1D
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "truncated")).eval()
        at_rank = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "at-rank")).eval()
    assert_parity(theirs(x), expected)
    assert_parity(at_rank(x), expected)
    save_adapter(model, tmp_path / "native", format="lightning_lora")
    assert_parity(load_adapter(copy.deepcopy(base), tmp_path / "native")(x), expected)


@pytest.mark.parametrize(
    "config, call, message",
    [
        (dict(), lambda m: set_active_rank(m, 0), r"rank must be an integer in 1\.\.4 .* got 0"),
        (dict(), lambda m: set_active_rank(m, 5), r"in 1\.\.4 .* got 5.*or None for the full rank"),
        (dict(), lambda m: set_active_rank(m, 2, update="first"), "update must be one of"),
        (dict(), lambda m: set_active_rank(m, 2, adapter_name="other"), "no adapter 'other'"),
        (dict(), lambda m: truncate_adapter(m, 7), r"in 1\.\.4 .* got 7"),
        (dict(rank_pattern={"lin1": 2}), lambda m: set_active_rank(m, 3), r"in 1\.\.2 .* got 3"),
        (dict(use_dora=True), lambda m: set_active_rank(m, 2), "adapter 'default' is a DoRA adapter"),
        (dict(init="orthogonal"), lambda m: set_active_rank(m, 2), "init='orthogonal'.*Use init='kaiming'"),
        (dict(init="pissa"), lambda m: truncate_adapter(m, 2), "init='pissa'"),
    ],
)
def test_bad_ranks_and_adapters_are_refused_and_nothing_changes(config: dict, call, message: str) -> None:
    _, model = _adapted("mlp", **config)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert all(s.active_rank is None for _, layer in lora_layers(model) for s in layer.lora_settings.values())


def test_a_loha_adapter_is_refused_by_name() -> None:
    model = apply_lora(build("mlp"), LoHaConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="plain LoRA adapters; adapter 'default' is a LoHa adapter"):
        set_active_rank(model, 1)


# ----- the Lightning schedule -----
def _fit(tmp_path: Path, schedule: DyLoraSchedule, module: L.LightningModule | None = None, **overrides: Any):
    """Fit BuiltInInit (4 steps per epoch, 2 epochs unless told otherwise) with a rank-4 adapter and ``schedule``."""
    L.seed_everything(0)
    module = module or BuiltInInit()
    ckpt_path = overrides.pop("ckpt_path", None)
    val_dataloaders = overrides.pop("val_dataloaders", None)
    config = overrides.pop("config", lora_config(modules_to_save=None))
    callbacks = [LoraCallback(config), schedule, *overrides.pop("callbacks", [])]
    overrides.setdefault("max_epochs", 2)
    trainer = L.Trainer(**trainer_arguments(default_root_dir=tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(module, dataloader(samples=16, batch_size=4), val_dataloaders, ckpt_path=ckpt_path)
    return module, trainer


def _draws(seed: int, count: int, low: int = 1, high: int = R) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(low, high + 1, (1,), generator=generator)) for _ in range(count)]


def test_training_samples_a_rank_per_step_logs_it_and_leaves_an_adapter_for_every_rank(tmp_path: Path) -> None:
    schedule = DyLoraSchedule(seed=5)
    logger = CSVLogger(tmp_path, name="run")
    module, trainer = _fit(tmp_path, schedule, logger=logger, log_every_n_steps=1)
    with open(Path(trainer.log_dir) / "metrics.csv") as handle:
        logged = [int(float(row["dylora/rank"])) for row in csv.DictReader(handle) if row.get("dylora/rank")]
    assert logged == _draws(5, 8) and len(set(logged)) > 1
    assert active_rank(module.model) is None  # eval_rank=None: fit ends at the full rank
    L.seed_everything(0)
    base = BuiltInInit().model  # the frozen base, as the fit started from it
    x = probe_inputs()
    for b in range(1, R + 1):
        set_active_rank(module.model, b)
        assert_parity(module.model(x), _rank_b_copy(base, module.model, b)(x))
        assert not torch.allclose(module.model(x), base(x))  # every rank learned something


def test_validation_runs_at_eval_rank_and_fit_ends_there(tmp_path: Path) -> None:
    class RankProbe(L.Callback):
        def __init__(self) -> None:
            self.ranks: list[tuple[str, Any]] = []

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.ranks.append(("val", active_rank(pl_module.model)))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.ranks.append(("train", active_rank(pl_module.model)))

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.ranks.append(("test", active_rank(pl_module.model)))

    probe = RankProbe()
    module, trainer = _fit(tmp_path, DyLoraSchedule(eval_rank=2, seed=1), callbacks=[probe], max_epochs=1,
                           limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=1,
                           val_dataloaders=dataloader())
    train = [rank for stage, rank in probe.ranks if stage == "train"]
    assert [rank for stage, rank in probe.ranks if stage == "val"] == [2, 2, 2]  # sanity check, after steps 2 and 4
    assert train == _draws(1, 4)
    assert active_rank(module.model) == 2
    trainer.validate(module, dataloader())
    assert probe.ranks[-1] == ("val", 2)
    trainer.test(module, dataloader())
    assert probe.ranks[-1] == ("test", 2)
    set_active_rank(module.model, 4)  # a rank chosen after fit is the one tested
    trainer.test(module, dataloader())
    assert probe.ranks[-1] == ("test", 4)


class FailsAtStepTwo(BuiltInInit):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 2:
            raise RuntimeError("killed at step 2")
        return super().training_step(batch, batch_idx)


def test_an_interrupted_fit_leaves_the_model_at_eval_rank(tmp_path: Path) -> None:
    module = FailsAtStepTwo()
    with pytest.raises(RuntimeError, match="killed at step 2"):
        _fit(tmp_path, DyLoraSchedule(eval_rank=3, seed=0), module)  # draws 1, 4, then 2 for the failing step
    assert active_rank(module.model) == 3


def test_one_rank_per_optimizer_step_under_gradient_accumulation(tmp_path: Path) -> None:
    class RankProbe(L.Callback):
        def __init__(self) -> None:
            self.ranks: list[Any] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.ranks.append(active_rank(pl_module.model))

    probe, schedule = RankProbe(), DyLoraSchedule(seed=3, min_rank=2)
    _, trainer = _fit(tmp_path, schedule, callbacks=[probe], accumulate_grad_batches=2)
    assert trainer.global_step == 4
    assert probe.ranks == [rank for rank in _draws(3, 4, low=2) for _ in range(2)]
    _fit(tmp_path, schedule, callbacks=[probe], accumulate_grad_batches=2)  # the same schedule again: same draws
    assert probe.ranks[8:] == probe.ranks[:8]


class SgdModule(BuiltInInit):
    """Plain SGD (no momentum, no weight decay): a rank with a zero gradient does not move."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(lora_param_groups(self, lr=0.1), lr=0.1)


class RandomizeAdapters(L.Callback):
    """Gives the adapter random values at train start (B too, so A gets gradients) and keeps a copy."""

    def on_train_start(self, trainer, pl_module) -> None:
        randomized(pl_module)
        self.before = {key: value.clone() for key, value in adapter_state_dict(pl_module).items()}


@pytest.mark.parametrize("update", ["last", "nested"])
def test_a_step_updates_the_sampled_rank_only_or_all_ranks_up_to_it(update: str, tmp_path: Path) -> None:
    seed = 3  # draws rank 3 of 4 for the first step
    assert _draws(seed, 1) == [3]
    snapshot = RandomizeAdapters()
    module, _ = _fit(tmp_path, DyLoraSchedule(update=update, seed=seed), SgdModule(), callbacks=[snapshot],
                     max_steps=1)
    moved = {0, 1, 2} if update == "nested" else {2}
    for key, value in adapter_state_dict(module).items():
        before = snapshot.before[key]
        changed = [i for i in range(R) if not torch.equal(
            value[i] if ".lora_A." in key else value[:, i], before[i] if ".lora_A." in key else before[:, i])]
        assert set(changed) == moved, (key, changed)


def test_resume_draws_the_ranks_an_uninterrupted_run_draws(tmp_path: Path) -> None:
    # The stopped run ends after its first epoch (step 4 of 8), standing in for a kill.
    uninterrupted, first = _fit(tmp_path / "a", DyLoraSchedule(seed=7))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", DyLoraSchedule(seed=7), max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True)
    resumed, second = _fit(tmp_path / "c", DyLoraSchedule(seed=7), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.global_step == 8
    for key, value in adapter_state_dict(uninterrupted).items():
        assert torch.equal(adapter_state_dict(resumed)[key], value), key
    states = [next(c for c in t.callbacks if isinstance(c, DyLoraSchedule)).state_dict() for t in (first, second)]
    assert torch.equal(states[0]["generator"], states[1]["generator"])
    assert states[0]["rank"] == states[1]["rank"] == _draws(7, 8)[-1]


@pytest.mark.parametrize(
    "build_schedule, message",
    [
        (lambda: DyLoraSchedule(min_rank=0), "min_rank must be an integer >= 1"),
        (lambda: DyLoraSchedule(update="first"), "update must be one of"),
        (lambda: DyLoraSchedule(eval_rank=1, min_rank=2), "eval_rank=1 is below min_rank=2"),
        (lambda: DyLoraSchedule(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_arguments_are_refused_when_the_schedule_is_built(build_schedule, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_schedule()


@pytest.mark.parametrize(
    "schedule, config, message",
    [
        (lambda: DyLoraSchedule(min_rank=5), lora_config(), r"min_rank=5\) is above the rank r=4"),
        (lambda: DyLoraSchedule(eval_rank=6), lora_config(), r"eval_rank=6\) is above the rank r=4"),
        (lambda: DyLoraSchedule(), lora_config(rank_pattern={"fc2": 2}), "per-layer ranks .* Drop rank_pattern"),
        (lambda: DyLoraSchedule(), lora_config(use_dora=True), "works on LoRA factors .*; adapter 'default' is a DoRA adapter"),
        (lambda: DyLoraSchedule(), LoHaConfig(r=2, target_modules=["fc1"]), "adapter 'default' is a LoHa adapter"),
        (lambda: DyLoraSchedule(), lora_config(init="orthogonal"), "init='orthogonal'"),
    ],
)
def test_a_run_the_schedule_cannot_serve_fails_before_any_training_step(schedule, config, message: str) -> None:
    L.seed_everything(0)
    module = BuiltInInit()
    before = {key: value.clone() for key, value in module.model.state_dict().items()}
    trainer = L.Trainer(**trainer_arguments(max_steps=4, callbacks=[LoraCallback(config), schedule()]))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0
    for key, value in module.model.state_dict().items():
        name = key.replace(".base_layer", "")
        if name in before:
            assert torch.equal(value, before[name]), key
    for _, layer in lora_layers(module):
        assert all(settings.active_rank is None for settings in layer.lora_settings.values())

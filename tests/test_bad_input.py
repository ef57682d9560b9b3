"""Bad input across the family never changes anything: every number is finite and in range where it is taken, every
file agrees with itself before it touches the model, every function checks everything before its first side effect,
a request that cannot be met in full says so with the real number, and a place a run will write is checked before
the first training step. Each refusal is asserted by its message and by the model (and the files) staying as they
were. One section per class; ``tests/test_errors.py`` holds the older injection and state-dict cases."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
from kind_cases import KIND_CASES, MLP, build, randomized, targets
from lightning_models import BuiltInInit, dataloader, lora_config, trainer_arguments
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_lora.core.common.safe_files as safe_files
from lightning_lora import (
    AdaLoraConfig,
    AdaLoraSchedule,
    AdapterExport,
    AmLoraSchedule,
    DeltaLoraSchedule,
    EvaConfig,
    LoHaConfig,
    LoKrConfig,
    LoraCallback,
    LoraConfig,
    LoraFAOptimizer,
    OFTConfig,
    OLoraSchedule,
    QuantizationConfig,
    ReLoraSchedule,
    VeraConfig,
    XLoraConfig,
    adapter_names,
    adapter_state_dict,
    add_amlora,
    add_weighted_adapter,
    apply_lora,
    load_adapter,
    load_adapter_state_dict,
    load_merged_state_dict,
    lora_layers,
    lora_param_groups,
    lorafa_optimizer,
    save_adapter,
    save_merged_model,
)
from lightning_lora.core.files.merged_export import TIED_KEYS_METADATA
from lightning_lora.lightning.fit_support import check_writable_destination
from lightning_lora.lightning.mixin import optimizer_defaults

pytestmark = pytest.mark.usefixtures("one_thread")

INF, NAN = float("inf"), float("nan")


# ----- what "nothing changed" means -----
def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "adapters": adapter_names(model),
        "active": {n: list(layer.active_adapters) for n, layer in lora_layers(model)},
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())  # bit for bit
    for key in ("trainable", "classes", "adapters", "active"):
        assert after[key] == before[key], key


def _files(directory: Path) -> Optional[dict[str, bytes]]:
    """Every file under ``directory`` (hidden ones too) with its bytes; None when it does not exist."""
    if not directory.exists():
        return None
    if directory.is_file():
        return {"": directory.read_bytes()}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _mlp_with_two_adapters(seed: int = 0) -> nn.Module:
    model = build("mlp", seed)
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["lin0", "lin1"]), "a")
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["lin0", "lin1"]), "b")
    return randomized(model)


# ===== 1. Non-finite or degenerate numbers are refused where they are taken =====
CONFIG_NUMBERS = [
    (lambda: LoraConfig(alpha=INF, target_modules=["lin0"]), r"alpha must be > 0 and finite, got inf"),
    (lambda: LoraConfig(alpha=NAN, target_modules=["lin0"]), r"alpha must be > 0 and finite, got nan"),
    (lambda: LoraConfig(alpha_pattern={"lin0": INF}, target_modules=["lin0"]), r"alpha_pattern\['lin0'\] must be > 0"),
    (lambda: LoHaConfig(alpha=INF, target_modules=["lin0"]), r"alpha must be > 0 and finite"),
    (lambda: LoKrConfig(alpha=NAN, target_modules=["lin0"]), r"alpha must be > 0 and finite"),
    (lambda: VeraConfig(r=4, d_initial=0.0, target_modules=["lin0"]),
     r"d_initial=0 with init_weights=True .* never trains"),
    (lambda: VeraConfig(r=4, d_initial=NAN, target_modules=["lin0"]), r"d_initial must be a finite number, got nan"),
    (lambda: VeraConfig(r=4, d_initial=INF, target_modules=["lin0"]), r"d_initial must be a finite number, got inf"),
    (lambda: VeraConfig(r=4, d_initial="0.1", target_modules=["lin0"]), r"d_initial must be a finite number"),
    (lambda: OFTConfig(eps=INF, target_modules=["lin0"]), r"eps must be > 0 and finite, got inf"),
    (lambda: OFTConfig(num_cayley_neumann_terms=1, target_modules=["lin0"]),
     r"num_cayley_neumann_terms=1 with use_cayley_neumann=True leaves every rotation the identity"),
    (lambda: AdaLoraConfig(alpha=INF, target_modules=["lin0"]), r"alpha must be > 0 and finite"),
    (lambda: AdaLoraConfig(orth_reg_weight=INF, target_modules=["lin0"]), r"orth_reg_weight must be >= 0 and finite"),
    (lambda: AdaLoraConfig(init_r=2, target_r=1, rank_pattern={"lin0": [1, 2]}, target_modules=["lin0"]),
     r"rank_pattern\['lin0'\] must hold init_r=2 booleans"),
    (lambda: LoraConfig(quantization=QuantizationConfig(bits=8, int8_threshold=INF), target_modules=["lin0"]),
     r"int8_threshold must be a finite number >= 0, got inf"),
    (lambda: LoraConfig(init="eva", eva_config=EvaConfig(rho=NAN), target_modules=["lin0"]),
     r"rho must be a finite number >= 1.0 .* got nan"),
    (lambda: LoraConfig(init="eva", eva_config=EvaConfig(rho=INF), target_modules=["lin0"]),
     r"rho must be a finite number >= 1.0 .* got inf"),
    (lambda: LoraConfig(init="eva", eva_config=EvaConfig(label_mask_value=0.5), target_modules=["lin0"]),
     r"label_mask_value must be an integer label"),
]


@pytest.mark.parametrize(("make_config", "message"), CONFIG_NUMBERS)
def test_a_config_number_that_is_not_finite_or_degenerate_is_refused_before_the_model_is_touched(
    make_config: Callable[[], Any], message: str
) -> None:
    model = MLP()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, make_config())
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"softmax_temperature": NAN}, r"softmax_temperature must be positive and finite, got nan"),
        ({"softmax_temperature": INF}, r"softmax_temperature must be positive and finite, got inf"),
        ({"scaling_pass_value": NAN}, r"scaling_pass_value must be a finite number"),
        ({"global_scaling_weight": INF}, r"global_scaling_weight must be a finite number"),
        ({"xlora_dropout_p": NAN}, r"xlora_dropout_p must be in \[0, 1\)"),
        ({"xlora_depth": 1.5}, r"xlora_depth must be an integer >= 1"),
        ({"top_k_lora": True}, r"top_k_lora must be an integer >= 1"),
        ({"hidden_size": 8.0}, r"hidden_size must be a positive integer"),
    ],
)
def test_xlora_config_numbers_are_checked(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        XLoraConfig(**fields)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DeltaLoraSchedule(update_ratio=INF), r"update_ratio must be > 0 and finite, got inf"),
        (lambda: DeltaLoraSchedule(update_ratio=NAN), r"update_ratio must be > 0 and finite, got nan"),
        (lambda: DeltaLoraSchedule(start_step=True), r"start_step must be a step index >= 0, got True"),
        (lambda: ReLoraSchedule(restart_every=4, optimizer_pruning=NAN), r"optimizer_pruning must be a fraction"),
        (lambda: ReLoraSchedule(restart_every=4, optimizer_pruning="0.5"), r"optimizer_pruning must be a fraction"),
        (lambda: ReLoraSchedule(restart_every=4, seed="0"), r"seed must be an integer"),
        (lambda: ReLoraSchedule(restart_every=True), r"restart_every must be a positive number of steps"),
        (lambda: OLoraSchedule(orthogonal_weight=INF), r"orthogonal_weight must be a number >= 0 and finite"),
        (lambda: OLoraSchedule(l2_weight=INF), r"l2_weight must be a number >= 0 and finite"),
        (lambda: AmLoraSchedule(l1_weight=INF), r"l1_weight must be a number >= 0 and finite"),
    ],
)
def test_a_schedule_number_that_is_not_finite_is_refused_before_any_run(make: Callable[[], Any], message: str) -> None:
    module = BuiltInInit()
    before = _snapshot(module)
    with pytest.raises(ValueError, match=message):
        L.Trainer(**trainer_arguments(max_steps=2, callbacks=[LoraCallback(lora_config(r=2)), make()])).fit(
            module, dataloader()
        )
    _assert_unchanged(module, before)


@pytest.mark.parametrize(
    ("weights", "options", "message"),
    [
        ([NAN, 1.0], {"combination_type": "linear"}, r"weights must be finite numbers .* nan is not"),
        ([INF, 1.0], {"combination_type": "svd"}, r"weights must be finite numbers .* inf is not"),
        (["1", 1.0], {"combination_type": "cat"}, r"weights must be finite numbers .* '1' is not"),
        ([1e300, 1.0], {"combination_type": "linear"}, r"gives NaN/Inf factors on \['lin0', 'lin1'\].*Nothing was"),
        ([1.0, 1.0], {"combination_type": "svd", "svd_clamp": 2.0}, r"svd_clamp must be a quantile in \[0, 1\]"),
        ([1.0, 1.0], {"combination_type": "svd", "svd_clamp": NAN}, r"svd_clamp must be a quantile in \[0, 1\]"),
        ([1.0], {"combination_type": "ties", "density": 5.0}, r"density must be in \(0, 1\]"),
        ([1.0, 1.0], {"combination_type": "dare_ties", "density": NAN}, r"needs a density in \(0, 1\]"),
    ],
)
def test_a_combination_with_non_finite_numbers_adds_nothing(weights: list, options: dict, message: str) -> None:
    model = _mlp_with_two_adapters()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(model, ["a", "b"][: len(weights)], weights, "combined", **options)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": torch.int8}, r"dtype must be a floating torch.dtype .* got torch.int8"),
        ({"max_shard_size": "0.5B"}, r"max_shard_size must be a positive number of bytes"),
    ],
)
def test_a_merged_export_with_a_degenerate_dtype_or_shard_size_writes_nothing(
    options: dict, message: str, tmp_path
) -> None:
    model = _mlp_with_two_adapters()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        save_merged_model(model, tmp_path / "merged", **options)
    _assert_unchanged(model, before)
    assert not (tmp_path / "merged").exists() and os.listdir(tmp_path) == []


def test_amlora_with_an_infinite_l1_weight_changes_nothing() -> None:
    model = _mlp_with_two_adapters()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"l1_weight must be a number >= 0 and finite, got inf"):
        add_amlora(model, "b", l1_weight=INF)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": INF}, r"lr must be a number > 0 and finite, got inf"),
        ({"lr": 1e-3, "weight_decay": NAN}, r"weight_decay must be a number >= 0 and finite, got nan"),
        ({"lr": 1e-3, "loraplus_lr_ratio": INF}, r"loraplus_lr_ratio must be a number > 0 and finite"),
        ({"lr": 1e-3, "loraplus_lr_ratio": 16, "loraplus_lr_embedding": NAN}, r"loraplus_lr_embedding must be"),
    ],
)
def test_parameter_groups_refuse_non_finite_rates_before_freezing_anything(arguments: dict, message: str) -> None:
    model = _mlp_with_two_adapters()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        lora_param_groups(model, lora_fa=True, **arguments)
    _assert_unchanged(model, before)  # lora_fa=True did not freeze any A


def test_an_optimizer_with_an_infinite_learning_rate_is_refused_by_the_mixin() -> None:
    with pytest.raises(ValueError, match=r"no positive default learning rate \(got inf; it must be finite"):
        optimizer_defaults(lambda params: torch.optim.SGD(params, lr=INF))


# ===== 2. A file that contradicts itself never loads =====
def _saved(tmp_path: Path, config: Any, format: str, name: str = "adapter") -> Path:
    model = randomized(apply_lora(build("mlp"), config))
    directory = tmp_path / name
    save_adapter(model, directory, format=format)
    return directory


def _edit(directory: Path, config: Optional[Callable[[dict], None]] = None,
          tensors: Optional[Callable[[dict], None]] = None) -> None:  # fmt: skip
    values = json.loads((directory / "adapter_config.json").read_text())
    stored = load_file(directory / "adapter_model.safetensors")
    if config is not None:
        config(values)
    if tensors is not None:
        tensors(stored)
    (directory / "adapter_config.json").write_text(json.dumps(values))
    save_file({k: v.contiguous() for k, v in stored.items()}, directory / "adapter_model.safetensors")


def _assert_load_refused(directory: Path, message: str) -> None:
    model = build("mlp")
    before, files = _snapshot(model), _files(directory)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, directory)
    _assert_unchanged(model, before)
    assert _files(directory) == files


ADALORA = AdaLoraConfig(init_r=4, target_r=2, alpha=6, total_step=10, target_modules=["lin0", "lin1"])
ALL_KEPT = {"lin0.lora_E": [True] * 4, "lin1.lora_E": [True] * 4}


def test_peft_adalora_file_whose_rank_pattern_keeps_fewer_ranks_than_its_tensors_hold_is_refused(tmp_path) -> None:
    directory = _saved(tmp_path, ADALORA, "peft")
    _edit(directory, config=lambda c: c.update(rank_pattern={**ALL_KEPT, "lin0.lora_E": [True, False, False, False]}))
    _assert_load_refused(directory, r"lin0: rank_pattern keeps 1 of 4 ranks, but the file's lora_A holds 4.*"
                                    r"contradicts itself")  # fmt: skip


def test_peft_itself_refuses_that_adalora_file(tmp_path) -> None:
    import peft

    directory = _saved(tmp_path, ADALORA, "peft")
    _edit(directory, config=lambda c: c.update(rank_pattern={**ALL_KEPT, "lin0.lora_E": [True, False, False, False]}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(build("mlp"), str(directory))


def test_adalora_file_whose_rank_pattern_names_a_layer_it_does_not_adapt_is_refused(tmp_path) -> None:
    directory = _saved(tmp_path, ADALORA, "peft")
    _edit(directory, config=lambda c: c.update(rank_pattern={**ALL_KEPT, "head.lora_E": [True] * 4}))
    _assert_load_refused(directory, r"rank_pattern names \['head'\], which adapter 'default' does not adapt")


def test_native_adalora_file_whose_pruned_ranks_hold_singular_values_is_refused(tmp_path) -> None:
    directory = _saved(tmp_path, ADALORA, "lightning_lora")
    pattern = {"lin0": [True, False, True, False], "lin1": [True] * 4}
    _edit(directory, config=lambda c: c["lora_config"].update(rank_pattern=pattern))
    _assert_load_refused(directory, r"lin0: rank_pattern prunes ranks \[1, 3\], but the file's lora_E holds non-zero")


def test_a_consistent_pruned_adalora_file_still_loads(tmp_path) -> None:
    directory = _saved(tmp_path, ADALORA, "peft")
    kept = [True, False, True, False]

    def keep_two(stored: dict) -> None:
        for leaf, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            key = f"base_model.model.lin0.{leaf}"
            stored[key] = stored[key].index_select(dim, torch.tensor([0, 2]))

    _edit(directory, config=lambda c: c.update(rank_pattern={**ALL_KEPT, "lin0.lora_E": kept}), tensors=keep_two)
    model = load_adapter(build("mlp"), directory)
    E = model.lin0.lora_E["default"].detach().flatten()
    assert E[1] == 0 and E[3] == 0 and E[0] != 0 and E[2] != 0


@pytest.mark.parametrize("format", ["peft", "lightning_lora"])
def test_vera_file_that_says_it_holds_its_projections_but_does_not_is_refused(format: str, tmp_path) -> None:
    directory = _saved(tmp_path, VeraConfig(r=4, target_modules=["lin0", "lin1"]), format)
    _edit(directory, tensors=lambda t: [t.pop(k) for k in list(t) if k.rsplit(".", 1)[-1] in ("vera_A", "vera_B")])
    _assert_load_refused(directory, r"holds the VeRA tensors \['vera_A', 'vera_B'\] .* save_projection=True.*missing")


def test_native_file_whose_kind_and_config_disagree_is_refused(tmp_path) -> None:
    directory = _saved(tmp_path, LoraConfig(r=2, target_modules=["lin0"]), "lightning_lora")
    _edit(directory, config=lambda c: c["lora_config"].update(use_dora=True))
    _assert_load_refused(directory, r"says kind='lora', but its lora_config describes a 'dora' adapter")


def _bump(case: str) -> Callable[[dict], None]:
    """Change the size field of a saved config so that it no longer describes the saved tensors."""

    def edit(values: dict) -> None:
        fields = values.get("lora_config", values)
        if case == "oft":
            fields["oft_block_size"] = 2
        elif case == "boft":
            fields["boft_block_size"] = 2
        elif case == "adalora":
            fields["init_r"] = fields["target_r"] = 3
        else:
            fields["r"] += 1

    return edit


@pytest.mark.parametrize("format", ["peft", "lightning_lora"])
@pytest.mark.parametrize("case", ["lora", "dora", "loha", "lokr", "oft", "boft", "vera", "vblora", "adalora"])
def test_a_file_whose_config_does_not_describe_its_tensors_is_refused_for_every_kind(
    case: str, format: str, tmp_path
) -> None:
    directory = _saved(tmp_path, KIND_CASES[case].config(targets("mlp")), format)
    _edit(directory, config=_bump(case))
    _assert_load_refused(directory, r"do(es)? not fit adapter 'default'")


@pytest.mark.parametrize(("field", "value"), [("lora_alpha", 1e400), ("lora_dropout", NAN)])
def test_a_peft_file_with_non_finite_numbers_is_refused(field: str, value: float, tmp_path) -> None:
    directory = _saved(tmp_path, LoraConfig(r=2, target_modules=["lin0"]), "peft")
    _edit(directory, config=lambda c: c.update({field: value}))
    _assert_load_refused(directory, r"adapter_config.json: (alpha|dropout) must be")


def test_a_merged_export_whose_tied_weights_point_nowhere_is_refused(tmp_path) -> None:
    directory = save_merged_model(_mlp_with_two_adapters(), tmp_path / "merged")
    stored = load_file(directory / "model.safetensors")
    tied = {"format": "pt", TIED_KEYS_METADATA: '{"head.weight": "gone"}'}
    save_file(stored, directory / "model.safetensors", metadata=tied)
    files = _files(directory)
    with pytest.raises(ValueError, match=r"lists tied weights \{'head.weight': 'gone'\} whose source tensors"):
        load_merged_state_dict(directory)
    assert _files(directory) == files


def test_an_adapter_state_with_nan_values_is_refused() -> None:
    model = _mlp_with_two_adapters()
    state = {k: torch.full_like(v, NAN) if k.startswith("lin1.lora_B") else v.clone()
             for k, v in adapter_state_dict(model, "a").items()}  # fmt: skip
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"NaN or Inf values in \['lin1.lora_B.a'\].*Nothing was loaded"):
        load_adapter_state_dict(model, state, "a")
    _assert_unchanged(model, before)


# ===== 3. Everything is checked before the first side effect =====
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": -1.0}, r"Invalid learning rate -1.0: it must be a finite number >= 0"),
        ({"lr": INF}, r"Invalid learning rate inf"),
        ({"lr": 1e-3, "betas": (1.0, 0.999)}, r"Invalid betas \(1.0, 0.999\): give two decay rates, each in \[0, 1\)"),
        ({"lr": 1e-3, "betas": (NAN, 0.999)}, r"Invalid betas"),
        ({"lr": 1e-3, "betas": (0.9, 0.99, 0.9)}, r"Invalid betas"),
        ({"lr": 1e-3, "eps": INF}, r"Invalid eps inf"),
        ({"lr": 1e-3, "weight_decay": NAN}, r"Invalid weight_decay nan"),
        ({"lr": 1e-3, "projection_dtype": torch.int8}, r"projection_dtype must be a floating torch.dtype"),
    ],
)
def test_lorafa_optimizer_refuses_before_freezing_any_A(arguments: dict, message: str) -> None:
    model = _mlp_with_two_adapters()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        lorafa_optimizer(model, **arguments)
    _assert_unchanged(model, before)
    assert model.lin0.lora_A["a"].requires_grad


def _frozen_pairs() -> tuple[nn.Module, list[tuple[nn.Parameter, nn.Parameter]]]:
    model = build("mlp")
    apply_lora(model, LoraConfig(r=2, target_modules=["lin0"]), "small")
    apply_lora(model, LoraConfig(r=4, target_modules=["lin1"]), "large")
    randomized(model)
    pairs = [(model.lin0.lora_A["small"], model.lin0.lora_B["small"]),
             (model.lin1.lora_A["large"], model.lin1.lora_B["large"])]  # fmt: skip
    for A, _ in pairs:
        A.requires_grad_(False)
    return model, pairs


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (lambda p: [{"params": [p[0][1], p[1][1]], "lora_A": [p[1][0], p[0][0]], "scaling": [1.0, 1.0]}],
         r"entry 0: lora_A \(4, 20\) has rank 4, its B \(20, 2\) rank 2"),
        (lambda p: [{"params": [p[0][1]], "lora_A": [p[0][0]], "scaling": [1.0]}, {"params": [p[0][0]]}],
         r"are the frozen `lora_A` of a LoRA group"),
        (lambda p: [{"params": [p[0][0]]}, {"params": [p[0][1]], "lora_A": [p[0][0]], "scaling": [1.0]}],
         r"lora_A still trains"),
        (lambda p: [{"params": [p[0][1]], "lora_A": [p[0][0]], "scaling": [NAN]}],
         r"scaling must be a finite number > 0"),
        (lambda p: [{"params": [p[0][1]], "lora_A": [p[0][0]]}], r"one `lora_A` tensor and one `scaling` per"),
    ],
)
def test_lorafa_optimizer_groups_that_do_not_fit_are_refused_when_built(groups: Callable, message: str) -> None:
    model, pairs = _frozen_pairs()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        LoraFAOptimizer(groups(pairs), lr=1e-2)
    _assert_unchanged(model, before)


def test_lorafa_optimizer_refuses_an_A_that_still_requires_grad() -> None:
    model, pairs = _frozen_pairs()
    pairs[0][0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"lora_A still trains \(requires_grad=True.*freeze_lora_A"):
        LoraFAOptimizer([{"params": [pairs[0][1]], "lora_A": [pairs[0][0]], "scaling": [1.0]}])


def test_lorafa_step_checks_every_gradient_before_updating_any_parameter() -> None:
    dense = nn.Parameter(torch.ones(3))
    embedding = nn.Embedding(5, 2, sparse=True)
    optimizer = LoraFAOptimizer([{"params": [dense]}, {"params": [embedding.weight]}], lr=0.1)
    (dense.sum() + embedding(torch.tensor([1])).sum()).backward()
    before = (dense.detach().clone(), embedding.weight.detach().clone())
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(dense, before[0]) and torch.equal(embedding.weight, before[1])
    assert not optimizer.state


# ===== 4. A request that cannot be met in full says so with the real number =====
def test_more_calibration_batches_than_the_loader_has_warns_and_logs_the_real_count(monkeypatch) -> None:
    import lightning_lora.lightning.calibration as calibration

    logged: list[str] = []
    monkeypatch.setattr(calibration, "rank_zero_info", logged.append)
    module = BuiltInInit()
    callback = LoraCallback(lora_config(init="corda_ipm"), calibration_batches=16)
    trainer = L.Trainer(**trainer_arguments(max_steps=1, callbacks=[callback]))
    message = r"calibration_batches=16, but the train dataloader gives only 2 batch\(es\): calibrating on 2"
    with pytest.warns(UserWarning, match=message):
        trainer.fit(module, dataloader(samples=8, batch_size=4))
    assert [m for m in logged if "calibrated on" in m] == [
        "LoRA adapter 'default': corda_ipm calibrated on 2 batch(es); ranks [4]."
    ]


def test_an_svd_rank_larger_than_a_layer_can_hold_warns_with_the_rank_it_gets() -> None:
    model = _mlp_with_two_adapters()
    with pytest.warns(UserWarning, match=r"svd_rank=64 is more than \['lin0', 'lin1'\] can hold .* rank 12..16"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "combined", "svd", svd_rank=64)
    assert {name: layer.lora_settings["combined"].r for name, layer in lora_layers(model)} == {"lin0": 12, "lin1": 16}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 7]),
         r"layers_to_transform=\[0, 7\]: no targeted layer has index \[7\] \(the targeted layers' indices are "
         r"\[0, 1\]\), so only \[0\] are adapted"),
        (LoraConfig(target_modules=["q_proj"], rank_pattern={"v_proj": 2}),
         r"rank_pattern keys \['v_proj'\] match no adapted layer"),
        (LoraConfig(target_modules=["q_proj"], alpha_pattern={"q_prj": 2.0}),
         r"alpha_pattern keys \['q_prj'\] match no adapted layer"),
    ],
)
def test_targeting_requests_the_model_cannot_meet_are_warned(config: LoraConfig, message: str) -> None:
    from models import tiny_llama

    with pytest.warns(UserWarning, match=message):
        apply_lora(tiny_llama(), config)


@pytest.mark.parametrize(
    ("config", "schedule", "message"),
    [
        (lora_config(r=2, modules_to_save=None), lambda: DeltaLoraSchedule(start_step=50),
         r"DeltaLoraSchedule\(start_step=50\) acts at optimizer step 50, but this run has 2 optimizer step"),
        (AdaLoraConfig(init_r=4, target_r=2, total_step=40, target_modules=["fc1", "fc2"]), lambda: AdaLoraSchedule(),
         r"total_step=40\) plans its rank budget down to target_r=2 over 40 optimizer steps; its last step acts at "
         r"optimizer step 39, but this run has 2 optimizer step\(s\), so it never does"),
    ],
)
def test_a_schedule_step_past_the_end_of_the_run_is_warned(config: Any, schedule: Callable, message: str) -> None:
    trainer = L.Trainer(**trainer_arguments(max_steps=2, callbacks=[LoraCallback(config), schedule()]))
    with pytest.warns(UserWarning, match=message):
        trainer.fit(BuiltInInit(), dataloader())


# ===== 5. Destinations are checked at fit start, by the path the user gave =====
def _fit_refused(tmp_path: Path, callbacks: list, message: str, watched: Path) -> None:
    """The fit raises ``message`` before its first step; the module and ``watched`` stay as they were."""
    module = BuiltInInit()
    LoraCallback(lora_config(r=2)).inject(module)
    before, files = _snapshot(module), _files(watched)
    trainer = L.Trainer(**trainer_arguments(max_steps=2, default_root_dir=tmp_path / "root",
                                            callbacks=[LoraCallback(lora_config(r=2)), *callbacks]))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0
    _assert_unchanged(module, before)
    assert _files(watched) == files


def test_adapter_export_into_an_existing_file_fails_at_fit_start_naming_it(tmp_path) -> None:
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    _fit_refused(tmp_path, [AdapterExport(target)],
                 rf"AdapterExport\(dirpath=...\) '{re.escape(str(target))}' is an existing file, not a directory",
                 target)  # fmt: skip


def test_adapter_export_under_a_file_fails_at_fit_start_naming_the_path(tmp_path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder should be")
    target = blocker / "adapter"
    _fit_refused(tmp_path, [AdapterExport(target)],
                 rf"'{re.escape(str(target))}' cannot be created: '{re.escape(str(blocker))}' on its path is a file",
                 blocker)  # fmt: skip


@pytest.mark.parametrize(
    ("export", "message"),
    [
        (lambda d: AdapterExport(d, adapter_name="other"), r"saves adapter 'other', but BuiltInInit has \['default'\]"),
        (lambda d: AdapterExport(d, submodule="net"), r"has no module 'net' to save the adapter of"),
        (lambda d: AdapterExport(d, format="vllm"), r"vLLM adapter holds only .* modules_to_save=\['head'\]"),
    ],
)
def test_adapter_export_that_could_not_write_its_file_fails_at_fit_start(
    export: Callable, message: str, tmp_path
) -> None:
    _fit_refused(tmp_path, [export(tmp_path / "adapter")], message, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_the_writable_check_asks_os_access(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(safe_files.os, "access", lambda path, mode: False)
    merged, parent = re.escape(str(tmp_path / "merged")), re.escape(str(tmp_path))
    message = rf"merged_weights_dir=\.\.\.\) '{merged}' is not writable: '{parent}' does not accept new files"
    with pytest.raises(ValueError, match=message + r" \(no write permission\)"):
        check_writable_destination(tmp_path / "merged", "LoraCallback(merged_weights_dir=...)")
    assert _files(tmp_path) == {}


def test_the_writable_check_creates_a_real_probe_file(monkeypatch, tmp_path) -> None:
    created = []
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        created.append(Path(path))
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(safe_files.os, "open", read_only)
    with pytest.raises(ValueError, match=r"does not accept new files \(Read-only file system\)"):
        check_writable_destination(tmp_path / "adapter", "AdapterExport(dirpath=...)")
    assert [p.parent for p in created] == [tmp_path]
    monkeypatch.setattr(safe_files.os, "open", real_open)
    check_writable_destination(tmp_path / "new" / "adapter", "AdapterExport(dirpath=...)")
    assert _files(tmp_path) == {} and not (tmp_path / "new").exists()  # the probe is gone, nothing was created


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_writable_destination(folder / "adapter", "AdapterExport(dirpath=...)")
    finally:
        folder.chmod(0o755)


def test_merged_weights_dir_under_a_file_fails_at_fit_start(tmp_path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file")
    module = BuiltInInit()
    LoraCallback(lora_config(r=2)).inject(module)
    before = _snapshot(module)
    callback = LoraCallback(lora_config(r=2), merge_on_fit_end=True, merged_weights_dir=blocker / "merged")
    trainer = L.Trainer(**trainer_arguments(max_steps=2, callbacks=[callback]))
    merged = re.escape(str(blocker / "merged"))
    with pytest.raises(ValueError, match=rf"merged_weights_dir=\.\.\.\) '{merged}' cannot be created"):
        trainer.fit(module, dataloader())
    assert trainer.global_step == 0
    _assert_unchanged(module, before)
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("save", [lambda m, d: save_adapter(m, d, "a"), lambda m, d: save_merged_model(m, d)])
def test_core_saves_name_the_target_they_cannot_write(save: Callable, tmp_path) -> None:
    model = _mlp_with_two_adapters()
    target = tmp_path / "out"
    target.write_text("keep me")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(target))}' is an existing file, not a directory"):
        save(model, target)
    _assert_unchanged(model, before)
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["out"]

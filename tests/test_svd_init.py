"""SVD-based inits (PiSSA, fast PiSSA, MiLoRA, OLoRA): numerics against PEFT, kept initial factors, resuming and
loading without re-running the SVD, adapter files, meta-device models, removal and rollback. Single process; see
test_svd_init_lightning.py (DDP, FSDP2, FSDP1, DeepSpeed through the callback) and test_svd_init_distributed.py
(sharded meta-device models with plain torch.distributed)."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from models import fresh, small_convnet, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from numerics import RELATIVE_TOLERANCE, assert_parity
from peft_oracle import peft_twin
from torch import nn

import lightning_lora.core.inits.svd_init as svd_init
from lightning_lora import (
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    delete_adapter,
    initialize_pending_adapters,
    load_adapter,
    load_adapter_state_dict,
    lora_layers,
    merge_and_unload,
    save_adapter,
    unload_lora,
)

SVD_INITS = ["pissa", "pissa_niter_4", "milora", "olora"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # Hugging Face Conv1D: weight stored [in, out]


pytestmark = pytest.mark.usefixtures("one_thread")




def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _config(init: str, **kwargs) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", "init": init, **kwargs})


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().clone() for name, layer in lora_layers(model)}


def _train(model: nn.Module, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = token_batch(seed=5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()


def _forbid_decompositions(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the init was re-run")

    for name in ("pissa_factors", "milora_factors", "olora_factors"):
        monkeypatch.setattr(svd_init, name, refuse)


def _assert_same_factors_up_to_sign(ours, theirs, rel: float | None = None) -> None:
    """A and B agree up to the sign of each singular pair (u_i, v_i), which the SVD leaves open."""
    (A, B), (A_ref, B_ref) = ours, theirs
    signs = torch.sign((A * A_ref).sum(dim=1))
    assert_parity(A, signs[:, None] * A_ref, rel=rel, msg="A")
    assert_parity(B, B_ref * signs, rel=rel, msg="B")


# ----- outputs and numerics -----


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize(
    "builder, targets, use_dora",
    [(tiny_llama, "all-linear", False), (tiny_llama, "all-linear", True), (tiny_gpt2, GPT2_TARGETS, False)],
    ids=["llama", "llama-dora", "gpt2-conv1d"],
)
def test_outputs_equal_the_base_model_at_init(builder, targets, use_dora: bool, init: str) -> None:
    base = fresh(builder)
    tokens = token_batch()
    model = apply_lora(copy.deepcopy(base), _config(init, target_modules=targets, use_dora=use_dora))
    residuals = _base_weights(model)
    assert all(not torch.equal(base.get_submodule(name).weight, weight) for name, weight in residuals.items())
    assert_parity(_logits(model, tokens), _logits(base, tokens))


@pytest.mark.parametrize(
    "builder, targets, dtype, options",
    [
        (tiny_llama, "all-linear", torch.float32, {}),
        (tiny_llama, "all-linear", torch.bfloat16, {}),
        (tiny_llama, "all-linear", torch.float32, {"use_rslora": True, "alpha": 3}),
        (tiny_gpt2, GPT2_TARGETS, torch.float32, {}),
    ],
    ids=["llama", "llama-bf16", "llama-rslora", "gpt2-conv1d"],
)
def test_pissa_matches_peft(builder, targets, dtype: torch.dtype, options: dict) -> None:
    base = fresh(builder).to(dtype)
    config = _config("pissa", target_modules=targets, **options)
    ours = apply_lora(copy.deepcopy(base), config)
    theirs = peft_twin(base, config, init_lora_weights="pissa")
    _assert_matches_peft(ours, theirs, rel=RELATIVE_TOLERANCE[dtype])


def test_fast_pissa_matches_peft_given_the_same_random_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    import peft.tuners.lora.layer as peft_layer

    def seeded_svd_lowrank(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(svd_init.SVD_SEED)
            return torch.svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded_svd_lowrank)
    base, config = fresh(), _config("pissa_niter_2")
    _assert_matches_peft(apply_lora(copy.deepcopy(base), config), peft_twin(base, config, "default", "pissa_niter_2"))


def test_olora_matches_peft() -> None:
    base, config = fresh(), _config("olora", alpha=6)
    _assert_matches_peft(apply_lora(copy.deepcopy(base), config), peft_twin(base, config, "default", "olora"))


def _assert_matches_peft(ours: nn.Module, theirs: nn.Module, rel: float | None = None) -> None:
    """Residual and factors equal PEFT's (PEFT's SVD inits refuse float64: compared in the model's dtype)."""
    layers = lora_layers(ours)
    assert layers
    for name, layer in layers:
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert_parity(layer.weight, peft_layer.get_base_layer().weight, rel=rel, msg=name)
        _assert_same_factors_up_to_sign(
            (layer.lora_A["default"], layer.lora_B["default"]),
            (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight),
            rel=rel,
        )


def test_milora_moves_the_smallest_singular_components_into_the_adapter() -> None:
    model = nn.Sequential(nn.Linear(12, 10))
    weight = model[0].weight.detach().clone()
    layer = apply_lora(model, LoraConfig(r=3, alpha=6, target_modules=["0"], init="milora"))[0]
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    scaling = 6 / 3
    adapter_part = scaling * layer.lora_B["default"] @ layer.lora_A["default"]
    assert_parity(adapter_part, U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:])
    assert_parity(torch.linalg.svdvals(layer.weight)[:7], S[:7])


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]
)
def test_fast_pissa_neither_depends_on_nor_advances_the_rng(device: str) -> None:
    rng = torch.cuda if device == "cuda" else torch.random
    factors = []
    for seed in (1, 2):
        model = fresh().to(device)
        rng.manual_seed(seed)
        state = rng.get_rng_state()
        apply_lora(model, _config("pissa_niter_2"))
        assert torch.equal(rng.get_rng_state(), state)
        factors.append(adapter_state_dict(model))
    assert all(torch.equal(factors[0][key], factors[1][key]) for key in factors[0])


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize(
    "builder, target", [(tiny_bert, "word_embeddings"), (small_convnet, "conv1")], ids=["embedding", "conv"]
)
def test_svd_inits_refuse_embeddings_and_convolutions(builder, target: str, init: str) -> None:
    model = fresh(builder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"init='{init}' is not defined for .*{target}"):
        apply_lora(model, LoraConfig(r=2, target_modules=[target], init=init))
    assert not lora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----- the kept initial factors -----


def test_initial_factors_are_frozen_and_saved_with_the_adapter() -> None:
    base = fresh()
    model = apply_lora(copy.deepcopy(base), _config("pissa"))
    state = adapter_state_dict(model)
    for name, layer in lora_layers(model):
        init_A, init_B = layer.lora_init_A["default"], layer.lora_init_B["default"]
        assert not init_A.requires_grad and not init_B.requires_grad
        assert torch.equal(state[f"{name}.lora_init_A.default"], init_A)
        assert torch.equal(state[f"{name}.lora_init_B.default"], init_B)
        assert torch.equal(init_A, layer.lora_A["default"]) and torch.equal(init_B, layer.lora_B["default"])
        scaling = layer.lora_settings["default"].scaling
        original = base.get_submodule(name).weight
        assert_parity(layer.weight + scaling * init_B @ init_A, original, msg=name)


def test_training_changes_neither_initial_factors_nor_residual() -> None:
    model = apply_lora(fresh(), _config("olora"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)


def test_merge_and_unload_keeps_the_trained_function() -> None:
    model = apply_lora(fresh(), _config("pissa"))
    _train(model)
    tokens = token_batch()
    expected = _logits(model, tokens)
    assert_parity(_logits(merge_and_unload(model), tokens), expected)


@pytest.mark.parametrize("remove", [lambda m: delete_adapter(m, "default"), unload_lora], ids=["delete", "unload"])
def test_removing_the_adapter_gives_back_the_original_base_weights(remove) -> None:
    base = fresh()
    model = apply_lora(copy.deepcopy(base), _config("pissa"))
    _train(model)
    remove(model)
    assert not lora_layers(model)
    for key, value in base.state_dict().items():
        assert_parity(model.state_dict()[key], value, msg=key)


def test_failed_injection_leaves_the_base_weights_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = svd_init.pissa_factors

    def fail_on_third_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(svd_init, "pissa_factors", fail_on_third_layer)
    base = fresh()
    model = copy.deepcopy(base)
    with pytest.raises(RuntimeError, match="boom"):
        apply_lora(model, _config("pissa"))
    assert not lora_layers(model)
    for key, value in base.state_dict().items():
        assert_parity(model.state_dict()[key], value, msg=key)


# ----- loading and resuming never re-run the init -----


def _original_run(init: str = "pissa_niter_2", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """(untouched base model, trained adapted model)."""
    base = fresh().to(dtype)
    model = apply_lora(copy.deepcopy(base), _config(init))
    _train(model)
    return base, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_adapter_loads_onto_the_original_base_without_rerunning_the_init(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, trained = _original_run(dtype=dtype)
    model = apply_lora(copy.deepcopy(base), _config("pissa_niter_2"), initialize=False)
    _forbid_decompositions(monkeypatch)
    load_adapter_state_dict(model, adapter_state_dict(trained))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert torch.equal(_logits(model, token_batch()), _logits(trained, token_batch()))


def test_resuming_with_load_state_dict_restores_the_residual_and_marks_adapters_initialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, trained = _original_run()
    checkpoint = adapter_state_dict(trained)  # an adapter-only checkpoint, as the Lightning layer saves
    model = apply_lora(copy.deepcopy(base), _config("pissa_niter_2"), initialize=False)
    _forbid_decompositions(monkeypatch)
    model.load_state_dict(checkpoint, strict=False)
    assert initialize_pending_adapters(model) == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_loading_over_a_fresh_init_of_the_same_weights_keeps_the_residual_bit_identical() -> None:
    base, trained = _original_run()
    model = apply_lora(copy.deepcopy(base), _config("pissa_niter_2"))  # the init ran again before the restore
    model.load_state_dict(adapter_state_dict(trained), strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_loading_other_factors_over_an_initialised_adapter_corrects_the_residual() -> None:
    base, trained = _original_run(init="pissa")
    model = apply_lora(copy.deepcopy(base), _config("pissa_niter_1"))  # same shapes, different factors
    load_adapter_state_dict(model, adapter_state_dict(trained))
    for key, value in trained.state_dict().items():
        assert_parity(model.state_dict()[key], value, msg=key)


def test_a_full_checkpoint_restores_the_residual_as_saved() -> None:
    base, trained = _original_run()
    model = apply_lora(copy.deepcopy(base), _config("pissa_niter_2"), initialize=False)
    model.load_state_dict(trained.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_apply_init_residual_refuses_a_base_weight_that_already_is_the_residual() -> None:
    model = apply_lora(fresh(), _config("pissa"))
    name, layer = lora_layers(model)[0]
    with pytest.raises(ValueError, match="already holds its residual"):
        svd_init.apply_init_residual(layer, "default")


# ----- meta device and progress -----


def test_meta_model_is_initialised_once_its_real_weights_are_loaded() -> None:
    base = fresh()
    eager = apply_lora(copy.deepcopy(base), _config("pissa"))
    with torch.device("meta"):
        model = tiny_llama()
    apply_lora(model, _config("pissa"))
    model.to_empty(device="cpu")
    for module in model.modules():  # Lightning's materialisation of a meta model
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    with pytest.raises(RuntimeError, match="initialize_pending_adapters"):
        model(token_batch())
    model.load_state_dict(base.state_dict(), strict=False)
    assert initialize_pending_adapters(model) == len(lora_layers(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in eager.state_dict().items())


def test_progress_lines_are_reported_while_the_init_is_slow() -> None:
    lines: list[str] = []
    model = apply_lora(fresh(), _config("pissa"), initialize=False)
    initialize_pending_adapters(model, progress=lines.append, progress_after_s=0.0)
    layers = len(lora_layers(model))
    assert lines[0].startswith(f"lightning_lora: initialised 1/{layers} adapter layers")
    assert lines[-1].startswith(f"lightning_lora: initialised {layers} adapter layers in")


def test_no_progress_line_for_a_quick_init() -> None:
    lines: list[str] = []
    model = apply_lora(fresh(), _config("pissa"), initialize=False)
    initialize_pending_adapters(model, progress=lines.append)
    assert lines == []


# ----- adapter files -----


@pytest.mark.parametrize(
    "builder, targets, init",
    [*((tiny_llama, "all-linear", init) for init in SVD_INITS), (tiny_gpt2, GPT2_TARGETS, "pissa")],
    ids=[*SVD_INITS, "gpt2-conv1d-pissa"],
)
def test_exported_svd_adapter_loads_in_peft_on_the_original_base(builder, targets, init: str, tmp_path) -> None:
    import peft

    base = fresh(builder)
    model = apply_lora(copy.deepcopy(base), _config(init, target_modules=targets))
    _train(model)
    save_adapter(model, tmp_path, format="peft")
    saved_keys = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors").keys()
    assert {key.rsplit(".", 2)[1] for key in saved_keys} == {"lora_A", "lora_B"}  # a plain LoRA delta
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for name, _ in lora_layers(model):
        assert torch.equal(theirs.base_model.model.get_submodule(name).get_base_layer().weight,
                           base.get_submodule(name).weight)
    tokens = token_batch()
    assert_parity(_logits(theirs, tokens), _logits(model, tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_adapter_file_rebuilds_the_residual_bit_for_bit(dtype: torch.dtype, tmp_path, monkeypatch) -> None:
    base, trained = _original_run(dtype=dtype)
    save_adapter(trained, tmp_path, format="lightning_lora")
    _forbid_decompositions(monkeypatch)
    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_peft_pissa_adapter_file_loads_like_peft(tmp_path) -> None:
    base = fresh()
    theirs = peft_twin(base, _config("pissa"), init_lora_weights="pissa")
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".lora_" in name:
                parameter.mul_(1.1)  # "trained"
    theirs.save_pretrained(tmp_path)  # init_lora_weights="pissa": the base weights are the loader's to rewrite
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    tokens = token_batch()
    assert_parity(_logits(ours, tokens), _logits(theirs, tokens))


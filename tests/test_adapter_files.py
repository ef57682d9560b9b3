"""Adapter files: exact round trips, atomic writes, bad input, merged-model export."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from adapter_cases import (
    CASES,
    assert_unchanged,
    case_config,
    inputs_for,
    make_svd_initialised,
    outputs,
    snapshot,
    trained_model,
)
from models import randomize_adapters, tiny_gpt2, tiny_llama, token_batch
from numerics import assert_parity
from safetensors.torch import save_file

from lightning_lora import (
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    get_lora_config,
    load_adapter,
    load_merged_state_dict,
    lora_layers,
    merge_lora,
    read_adapter_config,
    save_adapter,
    save_merged_model,
)
from lightning_lora.core.common import safe_files
from lightning_lora.core.files import adapter_files


def _assert_same_adapter(loaded, saved, adapter_name: str = "default") -> None:
    ours, theirs = adapter_state_dict(loaded, adapter_name), adapter_state_dict(saved, adapter_name)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


# ----- round trips -----
@pytest.mark.parametrize("format", ["lightning_lora", "peft"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_onto_the_base_model_restores_the_adapter_exactly(case: str, format: str, tmp_path) -> None:
    base, saved = trained_model(case)
    save_adapter(saved, tmp_path, format=format)

    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    _assert_same_adapter(loaded, saved)
    inputs = inputs_for(base)
    assert_parity(outputs(loaded, inputs), outputs(saved, inputs))


def test_own_format_keeps_the_config(tmp_path) -> None:
    base, saved = trained_model("llama-patterns")
    save_adapter(saved, tmp_path, format="lightning_lora")
    assert read_adapter_config(tmp_path, base) == get_lora_config(saved)
    assert get_lora_config(load_adapter(copy.deepcopy(base), tmp_path)) == get_lora_config(saved)


def test_load_fills_an_existing_adapter_in_place(tmp_path) -> None:
    base, saved = trained_model("bert-dora-modules_to_save")
    save_adapter(saved, tmp_path)
    model = apply_lora(copy.deepcopy(base), case_config("bert-dora-modules_to_save"))
    tensors_before = {k: id(v) for k, v in model.named_parameters()}

    load_adapter(model, tmp_path)
    _assert_same_adapter(model, saved)
    assert {k: id(v) for k, v in model.named_parameters()} == tensors_before  # optimizers keep their tensors


def test_loaded_adapter_trains_and_the_base_stays_frozen(tmp_path) -> None:
    base, saved = trained_model("llama-dora-embedding")
    save_adapter(saved, tmp_path, format="lightning_lora")
    model = load_adapter(copy.deepcopy(base), tmp_path, adapter_name="resumed")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model, "resumed"))
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable}

    tokens = token_batch()
    model(input_ids=tokens, labels=tokens).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(adapter_state_dict(model, "resumed")["model.layers.0.self_attn.q_proj.lora_B.resumed"],
                           adapter_state_dict(saved)["model.layers.0.self_attn.q_proj.lora_B.default"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen_before.items())


def test_svd_initialised_adapter_round_trips_onto_the_original_base(tmp_path) -> None:
    original = tiny_llama()
    saved = apply_lora(copy.deepcopy(original), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    make_svd_initialised(saved)
    save_adapter(saved, tmp_path, format="lightning_lora")

    loaded = load_adapter(copy.deepcopy(original), tmp_path)
    for (name, ours), (_, theirs) in zip(lora_layers(loaded), lora_layers(saved)):
        assert_parity(ours.weight, theirs.weight, msg=name)  # the same residual
        assert torch.equal(ours.lora_init_A["default"], theirs.lora_init_A["default"])
        assert torch.equal(ours.lora_init_B["default"], theirs.lora_init_B["default"])
        assert not ours.lora_init_A["default"].requires_grad
    tokens = token_batch()
    assert_parity(outputs(loaded, tokens), outputs(saved, tokens))


# ----- atomic writes -----
def test_a_save_that_fails_midway_leaves_the_previous_adapter(monkeypatch, tmp_path) -> None:
    base, first = trained_model("llama-patterns")
    save_adapter(first, tmp_path / "adapter")
    second = copy.deepcopy(first)
    randomize_adapters(second, seed=9)

    def write_half_then_crash(path, tensors, metadata=None):
        path.write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "write_safetensors", write_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(second, tmp_path / "adapter")
    _assert_same_adapter(load_adapter(copy.deepcopy(base), tmp_path / "adapter"), first)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind


def test_a_save_interrupted_while_moving_files_in_never_loads_half(monkeypatch, tmp_path) -> None:
    base, first = trained_model("llama-patterns")
    save_adapter(first, tmp_path)
    real_replace = os.replace

    def crash_on_config(source, target):
        if str(target).endswith("adapter_config.json"):
            raise OSError("power cut")
        real_replace(source, target)

    monkeypatch.setattr(safe_files.os, "replace", crash_on_config)
    with pytest.raises(OSError, match="power cut"):
        save_adapter(first, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing.*Save the adapter again"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_save_keeps_other_files_in_the_directory(tmp_path) -> None:
    _, model = trained_model("llama-patterns")
    (tmp_path / "README.md").write_text("my adapter")
    save_adapter(model, tmp_path)
    save_adapter(model, tmp_path, format="lightning_lora")
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_saved_files_are_readable_by_other_users_as_the_umask_allows(tmp_path) -> None:
    # A shared adapter folder is read by servers running as another user (vLLM); safetensors alone writes 0o600.
    _, model = trained_model("llama-patterns")
    previous = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "adapter")
        save_merged_model(model, tmp_path / "merged")
    finally:
        os.umask(previous)
    written = [*(tmp_path / "adapter").iterdir(), *(tmp_path / "merged").iterdir()]
    assert {path.stat().st_mode & 0o777 for path in written} == {0o644}


# ----- bad input: clear error, model unchanged -----
@pytest.fixture
def saved_dir(tmp_path):
    _, model = trained_model("llama-dora-embedding")
    save_adapter(model, tmp_path / "adapter", format="lightning_lora")
    return tmp_path / "adapter"


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _rewrite_tensors(directory, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = adapter_files.read_safetensors(path)[0]
    change(tensors)
    save_file(tensors, str(path))


def _rewrite_config(directory, change) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


BAD_INPUTS = {
    "missing-directory": (lambda d: os.rename(d, d.with_name("elsewhere")), FileNotFoundError, "does not exist"),
    "missing-config": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "adapter_config.json is"),
    "missing-tensors": (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "safetensors is"),
    "pickle-only": (lambda d: os.rename(d / "adapter_model.safetensors", d / "adapter_model.bin"), ValueError,
                    "pickle"),
    "truncated-tensors": (lambda d: _truncate(d / "adapter_model.safetensors"), ValueError, "truncated or corrupt"),
    "garbage-tensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"not a tensor file" * 9), ValueError,
                        "truncated or corrupt"),
    "invalid-json": (lambda d: (d / "adapter_config.json").write_text("{r: 4"), ValueError, "not valid JSON"),
    "unknown-config": (lambda d: (d / "adapter_config.json").write_text('{"r": 4}'), ValueError,
                       "neither a lightning_lora nor a PEFT"),
    "missing-key": (lambda d: _rewrite_tensors(d, lambda t: t.pop("model.layers.1.self_attn.v_proj.lora_A")),
                    ValueError, "1 missing key"),
    "unexpected-key": (lambda d: _rewrite_tensors(d, lambda t: t.update(extra=torch.zeros(2))), ValueError,
                       "1 unexpected key"),
    "wrong-shapes": (lambda d: _rewrite_config(d, lambda c: c["lora_config"].update(r=2)), ValueError,
                     "shape mismatch"),
    "targets-not-in-model": (lambda d: _rewrite_config(d, lambda c: c["lora_config"].update(target_modules=["c_attn"])),
                             ValueError, "matches no layer"),
    "nan-tensor": (lambda d: _rewrite_tensors(d, lambda t: t["model.layers.1.self_attn.v_proj.lora_A"].fill_(
                       float("nan"))), ValueError, r"NaN or Inf values in \['model.layers.1.self_attn.v_proj.lora_A'\]"),
    "missing-init-factor": (lambda d: _rewrite_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj."
                                                                               "lora_init_A": torch.zeros(4, 32)})),
                            ValueError, "initial SVD factors"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_adapter_files_raise_a_clear_error_and_leave_the_model_unchanged(bad: str, saved_dir) -> None:
    damage, error, message = BAD_INPUTS[bad]
    damage(saved_dir)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        load_adapter(model, saved_dir)
    assert_unchanged(model, before)


def test_loading_into_an_adapter_with_another_alpha_is_refused(saved_dir) -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=2, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                use_dora=True))
    before = snapshot(model)
    with pytest.raises(ValueError, match="differs from the saved one.*alpha=2.*alpha=8"):
        load_adapter(model, saved_dir)
    assert_unchanged(model, before)


def test_loading_into_a_merged_adapter_is_refused(saved_dir) -> None:
    model = merge_lora(apply_lora(tiny_llama(), case_config("llama-dora-embedding")))
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter(model, saved_dir)


def test_loading_onto_meta_weights_is_refused(saved_dir) -> None:
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        load_adapter(model, saved_dir)
    assert lora_layers(model) == []


def test_unknown_format_is_refused(tmp_path) -> None:
    _, model = trained_model("llama-patterns")
    with pytest.raises(ValueError, match="format must be one of"):
        save_adapter(model, tmp_path, format="onnx")


# ----- merged export -----
@pytest.mark.parametrize("case", ["llama-patterns", "bert-dora-modules_to_save", "convnet-dora"])
def test_merged_export_loads_strictly_into_the_original_class(case: str, tmp_path) -> None:
    base, model = trained_model(case)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    save_merged_model(model, tmp_path)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())  # live model untouched
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))
    fresh = CASES[case][0](seed=11)
    fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
    inputs = inputs_for(base)
    assert_parity(outputs(fresh, inputs), outputs(model, inputs))


def test_merged_export_is_sharded_with_an_index_above_the_size_limit(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    _, model = trained_model("llama-patterns")
    save_merged_model(model, tmp_path, max_shard_size="40KB")

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert all(os.path.getsize(tmp_path / s) < 40_000 + 2_000 for s in shards)  # + safetensors header
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = token_batch()
    assert_parity(outputs(reloaded, tokens), outputs(model, tokens))


def test_merged_export_replaces_the_previous_weight_files(tmp_path) -> None:
    _, model = trained_model("llama-patterns")
    save_merged_model(model, tmp_path, max_shard_size="40KB")
    save_merged_model(model, tmp_path, dtype=torch.bfloat16)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert {v.dtype for v in load_merged_state_dict(tmp_path).values()} == {torch.bfloat16}


def test_merged_export_stores_tied_weights_once(tmp_path) -> None:
    from transformers import GPT2LMHeadModel

    base = tiny_gpt2()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(model)
    save_merged_model(model, tmp_path)

    assert "lm_head.weight" not in adapter_files.read_safetensors(tmp_path / "model.safetensors")[0]
    fresh = tiny_gpt2(seed=11)
    fresh.load_state_dict(load_merged_state_dict(tmp_path), strict=True)
    tokens = token_batch()
    for reloaded in (fresh, GPT2LMHeadModel.from_pretrained(tmp_path).eval()):
        assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
        assert_parity(outputs(reloaded, tokens), outputs(model, tokens))


def test_merged_export_unties_weights_that_an_adapter_changes(tmp_path) -> None:
    from transformers import GPT2LMHeadModel

    _, model = trained_model("gpt2-rslora-bias")  # adapts wte, which lm_head shares
    with pytest.warns(UserWarning, match="transformer.wte.weight, which is tied to \\['lm_head.weight'\\]"):
        save_merged_model(model, tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = token_batch()
    assert_parity(outputs(reloaded, tokens), outputs(model, tokens))


def test_merged_export_of_non_finite_weights_writes_nothing(tmp_path) -> None:
    _, model = trained_model("llama-patterns")
    with torch.no_grad():
        lora_layers(model)[-1][1].lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        save_merged_model(model, tmp_path / "merged", max_shard_size="40KB")
    assert os.listdir(tmp_path) == []


def test_merged_export_with_a_missing_shard_does_not_load(tmp_path) -> None:
    _, model = trained_model("llama-patterns")
    save_merged_model(model, tmp_path, max_shard_size="40KB")
    sorted(tmp_path.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(FileNotFoundError, match="missing shards"):
        load_merged_state_dict(tmp_path)


@pytest.mark.parametrize("size", [0, "-1GB", "5 parsecs", True])
def test_merged_export_rejects_invalid_shard_sizes(size, tmp_path) -> None:
    _, model = trained_model("convnet-dora")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_merged_model(model, tmp_path, max_shard_size=size)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield

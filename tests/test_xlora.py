"""X-LoRA (``add_xlora``): a learned gate mixing frozen LoRA experts per token and per layer. Outputs and gate values
against PEFT's ``XLoraModel`` on a tiny Llama built from the same expert files, a hidden state named by module (any
``nn.Module``), training lowers the loss and moves only the classifier, exact resume from the trainable state, and
bad input refused with nothing changed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import randomize_adapters, tiny_llama, token_batch
from numerics import RELATIVE_TOLERANCE, assert_parity
from torch import nn
from torch.utils.checkpoint import CheckpointError

from lightning_lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
from lightning_lora.core.composition.xlora_classifier import XLoraConfig
from lightning_lora.core.composition.xlora import CLASSIFIER_NAME, add_xlora, remove_xlora, xlora_experts, xlora_scalings
from lightning_lora.core.layers.adapted_layer import lora_layers

peft = pytest.importorskip("peft")

# Experts of different ranks, alphas and target sets (expert "1" also adapts o_proj, "2" leaves q_proj out).
EXPERTS = {
    "0": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
    "1": LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]),
    "2": LoraConfig(r=4, alpha=16, target_modules=["v_proj", "down_proj"]),
}
NAMES = [f"expert{name}" for name in EXPERTS]  # ours must be identifiers; PEFT names its experts "0", "1", ...


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and does not stall when other work holds the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each expert trained on its own (random values here) and saved in PEFT's format."""
    root = tmp_path_factory.mktemp("experts")
    dirs = {}
    for seed, (name, config) in enumerate(EXPERTS.items()):
        model = tiny_llama()
        apply_lora(model, config, "default")
        randomize_adapters(model, seed=10 + seed, scale=0.3)
        dirs[name] = save_adapter(model, root / name, "default", format="peft")
    return dirs


def _base(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_llama().to(dtype)
    model.config.use_cache = False
    return model


def _ours(
    expert_dirs: dict[str, Path], config: XLoraConfig, hidden_states: str | None = None, dtype=torch.float32
) -> nn.Module:
    model = _base(dtype)
    for name, directory in zip(NAMES, expert_dirs.values()):
        load_adapter(model, directory, adapter_name=name)
    return add_xlora(model, NAMES, config, hidden_states=hidden_states)


def _peft(expert_dirs: dict[str, Path], config: XLoraConfig, dtype=torch.float32) -> nn.Module:
    fields = {k: v for k, v in config.__dict__.items() if k != "hidden_size"}
    if fields["scaling_pass_value"] is None:  # PEFT's set_scaling_pass_value(None): 1 / number of experts
        fields["scaling_pass_value"] = 1 / len(expert_dirs)
    adapters = {name: str(path) for name, path in expert_dirs.items()}
    peft_config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, **fields)
    return peft.get_peft_model(_base(dtype), peft_config).eval()


def _pair(
    expert_dirs: dict[str, Path], config: XLoraConfig, hidden_states: str | None = None, dtype=torch.float32
):
    theirs = _peft(expert_dirs, config, dtype)
    ours = _ours(expert_dirs, config, hidden_states, dtype).eval()
    classifier = theirs.base_model.internal_xlora_classifier
    with torch.no_grad():  # a classifier with visible preferences, the same in both
        generator = torch.Generator().manual_seed(5)
        for parameter in classifier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    getattr(ours, CLASSIFIER_NAME).load_state_dict(classifier.state_dict())
    return ours, theirs


VARIANTS = {
    "defaults": XLoraConfig(),
    "layerwise": XLoraConfig(layerwise_scalings=True),
    "top_k": XLoraConfig(layerwise_scalings=True, top_k_lora=2),
    "top_k_softmax_topk": XLoraConfig(top_k_lora=2, enable_softmax=False, enable_softmax_topk=True),
    "no_softmax_deep": XLoraConfig(enable_softmax=False, xlora_depth=3, xlora_size=16, global_scaling_weight=0.5),
    "temperature_pass_value": XLoraConfig(softmax_temperature=0.5, scaling_pass_value=0.25, layerwise_scalings=True),
    "top_1_pass_value_one_nth": XLoraConfig(top_k_lora=1, scaling_pass_value=None, layerwise_scalings=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_gate_values_equal_peft(expert_dirs: dict[str, Path], variant: str) -> None:
    # PEFT fills the scalings pass with 1 / n as a float32 tensor (XLoraClassifier.make_dummy_scalings), also in a
    # float64 model: with that pass value the gate and the logits carry float32 rounding.
    rel = RELATIVE_TOLERANCE[torch.float32] if VARIANTS[variant].scaling_pass_value is None else None
    ours, theirs = _pair(expert_dirs, VARIANTS[variant], dtype=torch.float64)
    ids = token_batch(length=7)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(ids).logits
    assert got.dtype == expected.dtype == torch.float64
    assert_parity(got, expected, rel=rel, msg="logits")
    expected_gate = theirs.base_model.get_latest_scalings()
    n_layers = len([1 for _, layer in lora_layers(ours) if layer.lora_settings])
    assert xlora_scalings(ours).shape == (2, 7, n_layers, 3) == expected_gate.shape
    assert_parity(xlora_scalings(ours), expected_gate, rel=rel, msg="gate")
    base = _base(torch.float64)(ids).logits
    assert (got - base).abs().max() > 1e-3  # the experts visibly act


def test_bfloat16_model_gate_values_equal_peft_and_logits_within_rounding(expert_dirs: dict[str, Path]) -> None:
    """Both keep the experts in float32 and the classifier in the model's bfloat16. The experts' weights multiply
    the rank-r intermediate here and the input in PEFT (cheaper: r values per token instead of `in`), so the logits
    differ by bfloat16 rounding only."""
    ours, theirs = _pair(expert_dirs, XLoraConfig(layerwise_scalings=True, top_k_lora=2), dtype=torch.bfloat16)
    assert getattr(ours, CLASSIFIER_NAME).layers[0].weight.dtype == torch.bfloat16
    ids = token_batch(length=7)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(ids).logits
    assert torch.equal(xlora_scalings(ours), theirs.base_model.get_latest_scalings())
    # The two paths round to bfloat16 at different points: measured 1.6e-2 of the largest logit (3 ulps), so the bound
    # is twice bfloat16's parity bound (the experts move the logits by more than the largest logit).
    assert_parity(got, expected, rel=2 * RELATIVE_TOLERANCE[torch.bfloat16])


def _classifier_grads(model: nn.Module, classifier: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad for p in classifier.parameters()]


def test_classifier_gradients_equal_peft(expert_dirs: dict[str, Path]) -> None:
    config = XLoraConfig(layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    ours, theirs = _pair(expert_dirs, config, dtype=torch.float64)
    ids = token_batch(length=6)
    expected = _classifier_grads(theirs, theirs.base_model.internal_xlora_classifier, ids)
    got = _classifier_grads(ours, getattr(ours, CLASSIFIER_NAME), ids)
    assert all(g.abs().max() > 0 for g in got)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        assert_parity(g, e)
    assert all(p.grad is None for name, p in ours.named_parameters() if not name.startswith(CLASSIFIER_NAME))


def test_activation_checkpointing_recomputes_with_the_same_gate(expert_dirs: dict[str, Path]) -> None:
    """Hugging Face gradient checkpointing reruns the layers during backward: the gate of that forward applies.
    PEFT removes its gate hooks when the forward returns, so its recomputation differs and torch refuses it."""
    config = XLoraConfig(layerwise_scalings=True, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    plain, _ = _pair(expert_dirs, config)
    checkpointed, theirs = _pair(expert_dirs, config)
    for model in (checkpointed, theirs):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_batch(length=6)
    expected = _classifier_grads(plain, getattr(plain, CLASSIFIER_NAME), ids)
    got = _classifier_grads(checkpointed, getattr(checkpointed, CLASSIFIER_NAME), ids)
    for g, e in zip(got, expected):
        assert_parity(g, e)
    with pytest.raises(CheckpointError):  # PEFT 0.21
        _classifier_grads(theirs, theirs.base_model.internal_xlora_classifier, ids)


def test_trainable_adapters_train_the_experts_too(expert_dirs: dict[str, Path]) -> None:
    frozen = _ours(expert_dirs, XLoraConfig())
    assert not any(p.requires_grad for name, p in frozen.named_parameters() if ".lora_" in name)
    trainable = _ours(expert_dirs, XLoraConfig(use_trainable_adapters=True))
    assert all(p.requires_grad for name, p in trainable.named_parameters() if ".lora_" in name)


def test_hidden_state_named_by_module_equals_peft(expert_dirs: dict[str, Path]) -> None:
    """Llama's ``hidden_states[-1]`` is the output of ``model.norm``: naming it gives PEFT's numbers too."""
    ours, theirs = _pair(expert_dirs, XLoraConfig(layerwise_scalings=True), hidden_states="model.norm",
                         dtype=torch.float64)
    ids = token_batch(length=5)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert expected.dtype == torch.float64
        assert_parity(ours(ids).logits, expected, msg="logits")
    assert_parity(xlora_scalings(ours), theirs.base_model.get_latest_scalings(), msg="gate")


def test_greedy_generation_equals_peft(expert_dirs: dict[str, Path]) -> None:
    ours, theirs = _pair(expert_dirs, XLoraConfig(layerwise_scalings=True, top_k_lora=2))
    prompt = token_batch(length=4)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    expected = theirs.generate(input_ids=prompt, **settings)  # PEFT's generate turns the cache off itself
    got = ours.generate(prompt, use_cache=False, **settings)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="use_cache=False"):
        ours.generate(prompt, use_cache=True, **settings)


def test_scalings_pass_with_value_zero_reads_the_base_models_hidden_state(expert_dirs: dict[str, Path]) -> None:
    """``scaling_pass_value=0`` (the default) weighs every expert by 0 in the scalings pass: the classifier reads the
    base model's last hidden state (other values are covered against PEFT above)."""
    model = _ours(expert_dirs, XLoraConfig(layerwise_scalings=True)).eval()
    seen = []
    getattr(model, CLASSIFIER_NAME).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = token_batch(length=5)
    with torch.no_grad():
        model(ids)
        base_hidden = _base()(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(seen[0], base_hidden, atol=0, rtol=0)


class TinyTagger(nn.Module):
    """A plain torch model (no Hugging Face): embedding, two blocks, a norm that gives the hidden state, a head."""

    def __init__(self, vocab: int = 40, width: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def _tagger_with_experts() -> nn.Module:
    torch.manual_seed(0)
    model = TinyTagger()
    for name in ["a", "b"]:
        apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=["blocks.0.0", "blocks.1.0", "embed"]), name)
    randomize_adapters(model, seed=3, scale=0.5)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor, steps: int):
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _task(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (4, 6), generator=generator)
    return ids, ids % 5


def test_a_later_all_linear_adapter_leaves_the_classifier_alone(expert_dirs: dict[str, Path]) -> None:
    model = _ours(expert_dirs, XLoraConfig(xlora_depth=2, hidden_size=32))
    apply_lora(model, LoraConfig(r=2, target_modules="all-linear"), adapter_name="later")
    adapted = [name for name, layer in lora_layers(model) if "later" in layer.lora_settings]
    assert adapted and not [name for name in adapted if "xlora_classifier" in name]


def test_training_lowers_the_loss_and_moves_only_the_classifier() -> None:
    model = add_xlora(_tagger_with_experts(), ["a", "b"], XLoraConfig(hidden_size=16, xlora_depth=2, xlora_size=8,
                                                                      xlora_dropout_p=0.0), hidden_states="norm")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(CLASSIFIER_NAME + ".") for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = _train(model, optimizer, *_task(), steps=30)
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert xlora_scalings(model).shape == (4, 6, 3, 2)  # embed and two linear layers, two experts


def test_resume_from_trainable_state_is_exact() -> None:
    config = XLoraConfig(hidden_size=16, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)
    task = _task()

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = add_xlora(_tagger_with_experts(), ["a", "b"], config, hidden_states="norm")
        torch.manual_seed(1)
        getattr(model, CLASSIFIER_NAME).apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)

    straight, straight_opt = fresh()
    _train(straight, straight_opt, *task, steps=6)
    first, first_opt = fresh()
    _train(first, first_opt, *task, steps=3)
    saved = {name: p.detach().clone() for name, p in first.named_parameters() if p.requires_grad}  # adapter-only
    saved_opt = copy.deepcopy(first_opt.state_dict())
    resumed, resumed_opt = fresh()
    missing, unexpected = resumed.load_state_dict(saved, strict=False)
    assert not unexpected and all(not key.startswith(CLASSIFIER_NAME) for key in missing)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, *task, steps=3)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_remove_xlora_restores_the_plain_multi_adapter_model() -> None:
    model = _tagger_with_experts()
    ids = _task()[0]
    before = model(ids)
    add_xlora(model, ["a", "b"], XLoraConfig(hidden_size=16), hidden_states="norm")
    assert xlora_experts(model) == ["a", "b"]
    remove_xlora(model)
    assert not hasattr(model, CLASSIFIER_NAME)
    torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no X-LoRA"):
        xlora_scalings(model)


def test_a_gated_layer_called_outside_the_models_forward_is_refused() -> None:
    model = add_xlora(_tagger_with_experts(), ["a", "b"], XLoraConfig(hidden_size=16), hidden_states="norm")
    with pytest.raises(RuntimeError, match="outside the forward of the model add_xlora was given"):
        model.blocks[0](torch.zeros(2, 3, 16))


def test_a_deep_copy_is_an_independent_xlora_model() -> None:
    model = add_xlora(_tagger_with_experts(), ["a", "b"], XLoraConfig(hidden_size=16), hidden_states="norm")
    ids = _task()[0]
    before = model(ids)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(ids), before, atol=0, rtol=0)
    with torch.no_grad():
        getattr(twin, CLASSIFIER_NAME).layers[-1].weight.mul_(-3)
    assert not torch.allclose(twin(ids), before)
    torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    assert xlora_scalings(twin) is not xlora_scalings(model)
    remove_xlora(twin)
    torch.testing.assert_close(model(ids), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("experts", "kwargs", "message"),
    [
        (["a", "zzz"], {"hidden_states": "norm"}, "unknown expert"),
        ([], {"hidden_states": "norm"}, "at least one expert"),
        (["a", "a"], {"hidden_states": "norm"}, "twice"),
        (["a", "b"], {"hidden_states": "nrom"}, r"no module named 'nrom'.*'norm'"),
        (["a", "b"], {}, "name the module whose output is the hidden state"),
        (["a", "b"], {"hidden_states": "norm", "config": XLoraConfig(hidden_size=16, top_k_lora=3)}, "top_k_lora=3"),
    ],
)
def test_bad_input_is_refused_with_nothing_changed(experts: list[str], kwargs: dict, message: str) -> None:
    model = _tagger_with_experts()
    kwargs.setdefault("config", XLoraConfig(hidden_size=16))
    state = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        add_xlora(model, experts, **kwargs)
    assert model.state_dict().keys() == state.keys() and not hasattr(model, CLASSIFIER_NAME)
    assert all(layer.forward_plan is None for _, layer in lora_layers(model))


def test_experts_of_another_kind_are_refused() -> None:
    from lightning_lora import LoHaConfig

    model = _tagger_with_experts()
    apply_lora(model, LoHaConfig(r=2, alpha=2, target_modules=["blocks.0.0"]), "loha")
    with pytest.raises(ValueError, match="plain LoRA.*'loha' is LoHa"):
        add_xlora(model, ["a", "loha"], XLoraConfig(hidden_size=16), hidden_states="norm")
    assert not hasattr(model, CLASSIFIER_NAME)


def test_merged_experts_are_refused() -> None:
    model = _tagger_with_experts()
    merge_lora(model, ["a"])
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        add_xlora(model, ["a", "b"], XLoraConfig(hidden_size=16), hidden_states="norm")


def test_a_second_xlora_is_refused() -> None:
    model = add_xlora(_tagger_with_experts(), ["a"], XLoraConfig(hidden_size=16), hidden_states="norm")
    with pytest.raises(ValueError, match="already on this model.*remove_xlora"):
        add_xlora(model, ["b"], XLoraConfig(hidden_size=16), hidden_states="norm")


def test_hugging_face_model_with_cache_is_refused(expert_dirs: dict[str, Path]) -> None:
    model = tiny_llama()
    model.config.use_cache = True
    load_adapter(model, expert_dirs["0"], adapter_name="expert0")
    with pytest.raises(ValueError, match="use_cache"):
        add_xlora(model, ["expert0"], XLoraConfig())


def test_config_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="enable_softmax_topk needs top_k_lora"):
        XLoraConfig(enable_softmax=False, enable_softmax_topk=True)
    with pytest.raises(ValueError, match="xlora_depth"):
        XLoraConfig(xlora_depth=0)
    with pytest.raises(ValueError, match="top_k_lora"):
        XLoraConfig(top_k_lora=0)


# ----- Lightning -----


class TaggerModule(__import__("lightning").LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyTagger()
        self.model.requires_grad_(False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        return nn.functional.cross_entropy(self.model(ids).flatten(0, 1), labels.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)


@pytest.fixture(scope="module")
def tagger_expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, root = _tagger_with_experts(), tmp_path_factory.mktemp("tagger_experts")
    return {name: save_adapter(model, root / name, name, format="peft") for name in ["a", "b"]}


TAGGER_CONFIG = XLoraConfig(hidden_size=16, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)


def _fit(
    tagger_expert_dirs: dict[str, Path],
    max_steps: int,
    ckpt_path: Path | None = None,
    config: XLoraConfig = TAGGER_CONFIG,
    experts: dict[str, Path] | None = None,
):
    import lightning as L
    from lightning_models import trainer_arguments
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora.lightning.xlora import XLoraCallback

    L.seed_everything(3, verbose=False)
    module = TaggerModule()
    experts = tagger_expert_dirs if experts is None else experts
    callback = XLoraCallback(experts, config, hidden_states="norm", submodule="model")
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(4)).repeat(4, 1)
    data = DataLoader(TensorDataset(ids, ids % 5), batch_size=4)  # every batch the same: resume needs no data state
    trainer = L.Trainer(**trainer_arguments(max_steps=max_steps, callbacks=[callback]))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def test_callback_loads_the_experts_trains_the_gate_and_resumes_exactly(
    tagger_expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    straight, _ = _fit(tagger_expert_dirs, max_steps=4)
    first, trainer = _fit(tagger_expert_dirs, max_steps=2)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved and all(".lora_" in key or key.startswith(f"model.{CLASSIFIER_NAME}.") for key in saved)
    assert any(key.startswith(f"model.{CLASSIFIER_NAME}.") for key in saved)
    resumed, _ = _fit(tagger_expert_dirs, max_steps=4, ckpt_path=path)
    classifier = getattr(straight.model, CLASSIFIER_NAME)
    assert not torch.equal(classifier.layers[0].weight, getattr(first.model, CLASSIFIER_NAME).layers[0].weight)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert xlora_experts(resumed.model) == ["a", "b"]


def test_resume_with_another_config_or_expert_order_is_refused(tagger_expert_dirs: dict[str, Path], tmp_path: Path):
    _, trainer = _fit(tagger_expert_dirs, max_steps=1)
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    other = XLoraConfig(**{**TAGGER_CONFIG.to_dict(), "softmax_temperature": 2.0})
    with pytest.raises(ValueError, match=r"softmax_temperature: checkpoint 1\.0 vs now 2\.0"):
        _fit(tagger_expert_dirs, max_steps=2, ckpt_path=path, config=other)
    swapped = dict(reversed(list(tagger_expert_dirs.items())))
    with pytest.raises(ValueError, match=r"experts \['a', 'b'\], in this order, not \['b', 'a'\]"):
        _fit(tagger_expert_dirs, max_steps=2, ckpt_path=path, experts=swapped)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if CLASSIFIER_NAME not in k}
    torch.save(checkpoint, tmp_path / "no_classifier.ckpt")
    with pytest.raises(ValueError, match=rf"does not fit.*model\.{CLASSIFIER_NAME}\.layers"):
        _fit(tagger_expert_dirs, max_steps=2, ckpt_path=tmp_path / "no_classifier.ckpt")


class CausalLMModule(__import__("lightning").LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _base()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_callback_on_a_hugging_face_model_trains_only_the_classifier(expert_dirs: dict[str, Path]) -> None:
    import lightning as L
    from lightning_models import trainer_arguments
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora.lightning.xlora import XLoraCallback

    module = CausalLMModule()
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    experts = dict(zip(NAMES, expert_dirs.values()))
    callback = XLoraCallback(experts, XLoraConfig(layerwise_scalings=True), submodule="model")
    data = DataLoader(TensorDataset(token_batch(batch=4, length=6)), batch_size=2)
    trainer = L.Trainer(**trainer_arguments(max_steps=2, callbacks=[callback]))
    trainer.fit(module, data)
    assert xlora_experts(module.model) == NAMES
    stepped = [p for p, state in trainer.optimizers[0].state.items() if state.get("step", 0) == 2]
    assert {id(p) for p in stepped} == {id(p) for p in getattr(module.model, CLASSIFIER_NAME).parameters()}
    loaded = _ours(expert_dirs, XLoraConfig()).state_dict()
    for name, tensor in module.model.state_dict().items():
        if not name.startswith(CLASSIFIER_NAME + "."):
            assert torch.equal(tensor, loaded[name] if ".lora_" in name else before[name]), name

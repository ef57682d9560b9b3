"""BOFT beyond the generic kind contract (``test_kinds.py`` runs the ``boft`` rows): its config and layer checks, the
butterfly factors against PEFT's, PEFT's CPU fallback and the files it writes, dropout, and convolutions PEFT's
unmerged forward gets wrong."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from kind_cases import build, randomized
from numerics import assert_parity
from torch import nn

from lightning_lora import (
    BOFTConfig,
    LoraConfig,
    OFTConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    save_adapter,
)
from lightning_lora.core.kinds.boft import BOFTKind, _shuffle

peft = pytest.importorskip("peft")
from peft.tuners.boft import layer as peft_boft  # noqa: E402

# (our config fields, rotated size): one factor, then two to four butterfly factors from a block size or a count
BUTTERFLIES = [
    (dict(boft_block_size=4), 16),
    (dict(boft_block_size=2, boft_n_butterfly_factor=2), 12),
    (dict(boft_block_size=2, boft_n_butterfly_factor=3), 32),
    (dict(boft_block_size=4, boft_n_butterfly_factor=3), 32),
    (dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=4), 32),
]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _peft_pair(fields: dict, size: int, tmp_path) -> tuple[nn.Module, nn.Module]:
    """PEFT's BOFT (random init) on a float64 linear reading ``size`` features, and ours loaded from its file."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(size, 6)).double()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(target_modules=["0"], init_weights=False,
                                                                       **fields))
    theirs.save_pretrained(tmp_path)
    return load_adapter(copy.deepcopy(base), tmp_path), theirs


# ----- config and layer checks -----
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(boft_block_size=4, boft_block_num=2), r"exactly one of boft_block_size .* and boft_block_num"),
        (dict(boft_block_size=0), r"exactly one of .* boft_block_size=0, boft_block_num=0; set one \(PEFT"),
        (dict(boft_block_size=-2), r"boft_block_size must be an integer >= 0, got -2"),
        (dict(boft_n_butterfly_factor=0), r"boft_n_butterfly_factor must be an integer >= 1"),
        (dict(boft_block_size=3, boft_n_butterfly_factor=2), r"boft_block_size=3 is odd, .* use an even block size"),
        (dict(boft_block_size=0, boft_block_num=6, boft_n_butterfly_factor=3),
         r"boft_block_num=6 is not a multiple of 2\*\*\(boft_n_butterfly_factor - 1\) = 4"),
        (dict(boft_dropout=1.0), r"boft_dropout must be in \[0, 1\)"),
        (dict(init_weights="gaussian"), r"init_weights must be True or False"),
    ],
)
def test_a_config_boft_cannot_build_is_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BOFTConfig(target_modules=["lin0"], **fields)


@pytest.mark.parametrize(
    "fields, message",
    [  # lin0 reads 12 features
        (dict(boft_block_size=5), r"boft_block_size=5 does not fit the 12 features .* lin0 .* choose .* \[4, 6\]"),
        (dict(boft_block_size=0, boft_block_num=5), r"boft_block_num=5 does not fit .* choose .* \[4, 6\]"),
        (dict(boft_block_size=4, boft_n_butterfly_factor=2),
         r"boft_block_size=4 does not fit .* 2 butterfly factors .* choose boft_block_size from \[2, 6\]"),
        (dict(boft_block_size=2, boft_n_butterfly_factor=4), r"fit 4 butterfly factors .* use fewer butterfly"),
    ],
)
def test_blocks_that_do_not_fit_a_layer_are_refused_with_what_fits_and_the_model_untouched(
    fields: dict, message: str
) -> None:
    model = build("mlp")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, BOFTConfig(target_modules=["lin1", "lin0"], **fields))
    assert _untouched(model, before)


@pytest.mark.parametrize(
    "layer, message",
    [
        (lambda: nn.Conv2d(4, 4, 1, groups=2), r"1 is a grouped convolution \(groups=2\), which BOFT cannot adapt"),
        (lambda: nn.Conv1d(4, 4, 1), r"A BOFT adapter cannot go on 1 \(Conv1d\): BOFT adapts nn.Linear and"),
        (lambda: nn.Embedding(10, 4), r"A BOFT adapter cannot go on 1 \(Embedding\): BOFT adapts nn.Linear and"),
    ],
)
def test_a_layer_boft_cannot_adapt_is_refused_by_name(layer, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), layer())
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, BOFTConfig(target_modules=["0", "1"]))
    assert _untouched(model, before)


@pytest.mark.parametrize("first", [OFTConfig(oft_block_size=4, target_modules=["lin0"]),
                                   BOFTConfig(target_modules=["lin0"])], ids=["oft", "boft"])
def test_a_second_rotation_on_a_layer_is_refused_and_an_added_lora_is_not(first) -> None:
    model = apply_lora(build("mlp"), first)
    before = _state(model)
    with pytest.raises(ValueError, match=r"lin0 already has the B?OFT adapter 'default'; one rotation per layer"):
        apply_lora(model, BOFTConfig(target_modules=["lin0"]), "second")
    assert _state(model).keys() == before.keys()
    apply_lora(model, LoraConfig(r=2, target_modules=["lin0"]), "lora")  # adds to the rotated output


def test_a_peft_file_with_an_option_we_lack_is_refused_by_name(tmp_path) -> None:
    save_adapter(randomized(apply_lora(build("mlp"), BOFTConfig(target_modules=["lin0", "lin1"]))), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = build("mlp")
    before = _state(model)
    with pytest.raises(ValueError, match="some_future_option"):
        load_adapter(model, tmp_path)
    assert _untouched(model, before)


# ----- the butterfly against PEFT -----
@pytest.mark.parametrize("fields, size", BUTTERFLIES)
def test_butterfly_permutations_and_rotation_are_peft_s(fields: dict, size: int, tmp_path) -> None:
    ours, theirs = _peft_pair(fields, size, tmp_path)
    peft_layer, layer = theirs.base_model.model[0], ours[0]
    kind = BOFTKind()
    blocks = kind.rotations(layer, "default")
    identity = torch.eye(size, dtype=torch.float64)
    assert peft_layer.boft_P.shape[0] == blocks.shape[0] == fields.get("boft_n_butterfly_factor", 1)
    for index, permutation in enumerate(peft_layer.boft_P):  # I P_i^T
        assert torch.equal(_shuffle(identity, index, blocks.shape[-1]), permutation.t().double()), index
        assert torch.equal(_shuffle(identity, index, blocks.shape[-1], inverse=True), permutation.double()), index
    rotation = kind.butterfly(identity, blocks)
    assert_parity(rotation, peft_layer.get_delta_weight("default")[0], msg="M")
    assert_parity(rotation @ rotation.t(), identity, msg="orthogonal")
    assert_parity(kind.butterfly(identity, blocks, transposed=True), rotation.t(), msg="M^T")


@pytest.mark.parametrize("fields, size", BUTTERFLIES)
def test_forward_gradients_and_merge_equal_peft_for_every_butterfly(fields: dict, size: int, tmp_path) -> None:
    ours, theirs = _peft_pair(fields, size, tmp_path)
    x = torch.randn(5, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (ours, theirs):
        inputs = x.clone().requires_grad_(True)
        out = model(inputs)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads = {n.split(".")[-2]: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), inputs.grad, grads))
    (out, x_grad, grads), (peft_out, peft_x_grad, peft_grads) = results
    assert_parity(out, peft_out, msg="output")
    assert_parity(x_grad, peft_x_grad, msg="input gradient")
    assert grads.keys() == peft_grads.keys() == {"boft_R", "boft_s"}
    for name, grad in grads.items():
        assert_parity(grad, peft_grads[name], msg=name)
    assert_parity(merge_and_unload(ours)(x), theirs.merge_and_unload()(x), msg="merged")


def test_dropout_replaces_the_same_blocks_as_peft_for_the_same_seed(tmp_path) -> None:
    ours, theirs = _peft_pair(dict(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5), 12, tmp_path)
    x = torch.randn(4, 12, dtype=torch.float64)
    outputs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(5)
        outputs.append([model(x) for _ in range(3)])
    for step, (mine, peft_s) in enumerate(zip(*outputs)):
        assert_parity(mine, peft_s, msg=f"step {step}")
    assert not torch.allclose(outputs[0][0], ours.eval()(x))  # blocks were dropped
    merged = merge_and_unload(copy.deepcopy(ours).train())  # merging never drops blocks, even in training
    assert_parity(merged(x), ours.eval()(x), msg="merged in training")


# ----- PEFT without its CUDA extension -----
@pytest.fixture
def peft_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's own CPU path: no fbd_cuda (and no attempt to compile it)."""
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", None)
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)


def test_peft_s_cpu_path_loads_here_with_its_outputs_and_merge(peft_without_extension, tmp_path) -> None:
    ours, theirs = _peft_pair(dict(boft_block_size=4), 12, tmp_path)
    assert not theirs.base_model.model[0].fbd_cuda_available
    x = torch.randn(3, 12, dtype=torch.float64)
    assert_parity(ours(x), theirs(x))
    assert_parity(merge_and_unload(ours)(x), theirs.merge_and_unload()(x), msg="merged")


def test_a_peft_file_trained_with_fewer_factors_than_it_says_is_refused_with_the_fix(
    peft_without_extension, tmp_path
) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 6)).double()
    config = peft.BOFTConfig(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert theirs.base_model.model[0].boft_R["default"].shape[0] == 1  # PEFT dropped the second factor silently
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError, match=r"boft_R holds 1 butterfly factor, .* \"boft_n_butterfly_factor\": 1"):
        load_adapter(model, tmp_path)
    assert _untouched(model, before)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "boft_n_butterfly_factor": 1}))
    x = torch.randn(3, 12, dtype=torch.float64)
    assert_parity(load_adapter(model, tmp_path)(x), theirs(x))


# ----- convolutions -----
def test_a_dilated_conv_computes_its_merged_weight_where_peft_s_forward_does_not(tmp_path) -> None:
    """PEFT 0.21's BOFT convolution forward passes only ``padding[0]`` and ``stride[0]`` to ``F.conv2d``: dilation
    (and asymmetric padding or stride) is lost until it merges. Ours runs the base's own geometry."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, dilation=2, padding=(2, 1))).double()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(target_modules=["0"], init_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    unmerged = ours(x)
    assert theirs(x).shape != unmerged.shape  # PEFT's unmerged forward: another geometry
    assert_parity(unmerged, theirs.merge_and_unload()(x), msg="PEFT merged")
    assert_parity(merge_and_unload(ours)(x), unmerged, msg="ours merged")


def test_a_non_square_kernel_adapts_but_is_refused_for_peft_export(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, (3, 1)))
    model = randomized(apply_lora(copy.deepcopy(base), BOFTConfig(target_modules=["0"])))
    x = torch.randn(2, 4, 5, 5)
    assert_parity(merge_and_unload(copy.deepcopy(model))(x), model(x))
    with pytest.raises(ValueError, match=r"0 has a 3x1 kernel, but PEFT's BOFT .* format='lightning_lora'"):
        save_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())
    save_adapter(model, tmp_path / "native", format="lightning_lora")
    assert_parity(load_adapter(copy.deepcopy(base), tmp_path / "native")(x), model(x), rel=0)

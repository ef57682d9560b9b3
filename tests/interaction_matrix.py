"""Every method x every operation: the rows (methods as a user trains them through a Trainer) and the columns
(what users do next), each cell run on TinyNet and checked by numbers.

A new method adds a row to :data:`METHODS`; a new operation a column to :data:`OPERATIONS`. What a cell should do
is in ``tests/test_interaction_matrix.py`` (:data:`REFUSED`: the cells refused by name; every other cell works).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning_models import (
    BuiltInInit,
    RegressionSteps,
    TinyNet,
    dataloader,
    lora_config,
    probe_inputs,
    trainer_arguments,
)
from models import randomize_adapters
from numerics import assert_parity
from peft_boft import use_torch_block_diag_in_peft
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import (
    AdaLoraConfig,
    AdaLoraSchedule,
    AmLoraSchedule,
    BOFTConfig,
    DeltaLoraSchedule,
    DyLoraSchedule,
    EvaConfig,
    LoHaConfig,
    LoKrConfig,
    LoraCallback,
    OFTConfig,
    OLoraSchedule,
    QuantizationConfig,
    ReLoraSchedule,
    VBLoRAConfig,
    VeraConfig,
    XLoraConfig,
    add_weighted_adapter,
    apply_lora,
    disable_adapters,
    get_lora_config,
    load_adapter,
    lora_param_groups,
    merge_and_unload,
    merge_lora,
    mixed_adapter_batch,
    quantized_layers,
    read_adapter_config,
    save_adapter,
    save_merged_model,
    set_active_adapters,
    unmerge_lora,
)
from lightning_lora.lightning.xlora import XLoraCallback

use_torch_block_diag_in_peft()  # PEFT's butterfly factors > 1 otherwise need its CUDA extension (peft_boft.py)
STEPS = 3


class TokenNet(nn.Module):
    """An embedding, a hidden linear layer and a head: token ids in (for trainable token rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.head = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(self.embed(ids))))

    @staticmethod
    def probe() -> torch.Tensor:
        return torch.randint(0, 30, (5,), generator=torch.Generator().manual_seed(7))


class Mixer(nn.Module):
    """A layer that computes with its weight directly, no ``nn.Linear`` (for ``target_parameters``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class ParameterNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = Mixer(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)))


def token_data() -> DataLoader:
    generator = torch.Generator().manual_seed(123)
    ids, y = torch.randint(0, 30, (16,), generator=generator), torch.randn(16, 4, generator=generator)
    return DataLoader(TensorDataset(ids, y), batch_size=4)


class NetModule(RegressionSteps, L.LightningModule):
    """A LightningModule around a network built in ``__init__``."""

    def __init__(self, network: Callable[[], nn.Module] = TinyNet) -> None:
        super().__init__()
        self.model = network()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=1e-2))


class TwoTasks(BuiltInInit):
    """TinyNet with a first adapter ("task1") already trained (random values stand in for it)."""

    def __init__(self) -> None:
        super().__init__()
        apply_lora(self.model, lora_config(r=2, modules_to_save=None), "task1")
        randomize_adapters(self.model, scale=0.3)


@dataclass(frozen=True)
class Method:
    """One row: how a user trains the method through a Trainer.

    Args:
        config: The adapter the LoraCallback adds (None: the method's own callback adds what it trains).
        adapter: The adapter name the row trains.
        module: The LightningModule.
        schedules: Further callbacks (schedules, X-LoRA's callback).
        lora_options: More LoraCallback arguments.
        finish: What the user does after fit to get the method's model (combining adapters).
        network: The plain network (the base the module's model starts from), and ``data`` its training data.
        result: The adapter the model computes with after ``finish`` (default: ``adapter``), the one exported.
    """

    config: Optional[Callable[[], Any]]
    adapter: str = "default"
    module: Callable[[], L.LightningModule] = BuiltInInit
    schedules: Callable[[], list[Any]] = lambda: []
    lora_options: dict[str, Any] = field(default_factory=dict)
    finish: Optional[Callable[[nn.Module], None]] = None
    result: Optional[str] = None
    network: Callable[[], nn.Module] = TinyNet
    data: Callable[[], DataLoader] = dataloader

    @property
    def exported(self) -> str:
        return self.result or self.adapter

    def callbacks(self, **lora_options: Any) -> list[Any]:
        lora = [] if self.config is None else [LoraCallback(
            self.config(), adapter_name=self.adapter, submodule="model", **{**self.lora_options, **lora_options})]
        return [*lora, *self.schedules()]  # fmt: skip


def _low_rank(**options: Any) -> Callable[[], Any]:
    return lambda: lora_config(**{"modules_to_save": None, **options})


def _combine(model: nn.Module) -> None:
    add_weighted_adapter(model, ["task1", "default"], [0.5, 1.0], "combined", combination_type="cat")
    set_active_adapters(model, ["combined"])


def _xlora_experts() -> list[Any]:
    return [XLoraCallback(["task1", "task2"], XLoraConfig(hidden_size=16), hidden_states="fc2", submodule="model")]


class TwoExperts(TwoTasks):
    def __init__(self) -> None:
        super().__init__()
        apply_lora(self.model, lora_config(r=3, alpha=3, modules_to_save=None), "task2")
        randomize_adapters(self.model, seed=4, scale=0.3)


class LoraPlusModule(BuiltInInit):
    """LoRA+: ``B`` learns ``loraplus_lr_ratio`` times faster than ``A``."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_param_groups(self, lr=self.lr, loraplus_lr_ratio=16))


def _targets() -> list[str]:
    return ["fc1", "fc2"]


def _adalora() -> AdaLoraConfig:
    return AdaLoraConfig(init_r=4, target_r=2, alpha=4, total_step=STEPS, tinit=0, tfinal=0, delta_t=1,
                         target_modules=_targets())  # fmt: skip


METHODS: dict[str, Method] = {
    "LoRA": Method(_low_rank()),
    "rsLoRA": Method(_low_rank(use_rslora=True)),
    "DoRA": Method(_low_rank(use_dora=True)),
    "PiSSA": Method(_low_rank(init="pissa")),
    "MiLoRA": Method(_low_rank(init="milora")),
    "OLoRA": Method(_low_rank(init="olora")),
    "CorDA": Method(_low_rank(init="corda_ipm"), lora_options={"calibration_batches": 2}),
    "EVA": Method(_low_rank(init="eva", eva_config=EvaConfig(rho=1.0)), lora_options={"calibration_batches": 2}),
    "QLoRA 8-bit": Method(_low_rank(quantization=QuantizationConfig(bits=8))),
    "LoftQ 8-bit": Method(_low_rank(init="loftq", quantization=QuantizationConfig(bits=8))),
    "LoRA+": Method(_low_rank(), module=LoraPlusModule),
    "trainable tokens": Method(_low_rank(target_modules=["fc1"], trainable_token_indices={"embed": [1, 3, 5]}),
                               module=lambda: NetModule(TokenNet), network=TokenNet, data=token_data),
    "target_parameters": Method(_low_rank(target_modules=[], target_parameters=["mix.weight"]),
                                module=lambda: NetModule(ParameterNet), network=ParameterNet),
    "LoRA-FA": Method(_low_rank(), lora_options={"lora_fa": True}),
    "LoHa": Method(lambda: LoHaConfig(r=2, alpha=4, target_modules=_targets())),
    "LoKr": Method(lambda: LoKrConfig(r=2, alpha=4, target_modules=_targets())),
    "OFT": Method(lambda: OFTConfig(oft_block_size=4, target_modules=_targets())),
    "BOFT": Method(lambda: BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=_targets())),
    "VeRA": Method(lambda: VeraConfig(r=4, target_modules=_targets())),
    "VB-LoRA": Method(lambda: VBLoRAConfig(r=2, num_vectors=8, vector_length=4, target_modules=_targets())),
    "AdaLoRA": Method(_adalora, schedules=lambda: [AdaLoraSchedule()]),
    "ReLoRA": Method(_low_rank(), schedules=lambda: [ReLoraSchedule(restart_every=2, restart_warmup_steps=1)]),
    "Delta-LoRA": Method(_low_rank(), schedules=lambda: [DeltaLoraSchedule(start_step=1)]),
    "DyLoRA": Method(_low_rank(), schedules=lambda: [DyLoraSchedule(eval_rank=2, seed=1)]),
    "X-LoRA": Method(None, adapter="task2", module=TwoExperts, schedules=_xlora_experts),
    "weighted combination": Method(_low_rank(), module=TwoTasks, finish=_combine, result="combined"),
    "O-LoRA": Method(_low_rank(r=2), adapter="task2", module=TwoTasks, schedules=lambda: [OLoraSchedule("task2")]),
    "AM-LoRA": Method(_low_rank(r=2), adapter="task2", module=TwoTasks, schedules=lambda: [AmLoraSchedule("task2")]),
}  # fmt: skip


# ----- running a row -----
def fit(
    method: Method, trainer_options: Optional[dict[str, Any]] = None, finish: bool = True, **lora_options: Any
) -> L.LightningModule:
    """The row's module after ``STEPS`` training steps (and its finishing step, with ``finish``)."""
    L.seed_everything(0, verbose=False)
    module = method.module()
    trainer = L.Trainer(**trainer_arguments(max_steps=STEPS, callbacks=method.callbacks(**lora_options),
                                            **(trainer_options or {})))  # fmt: skip
    trainer.fit(module, method.data())
    if finish and method.finish is not None:
        method.finish(module.model)
    module.eval()
    return module


def outputs(model: nn.Module) -> torch.Tensor:
    """The model's outputs on the probe inputs, in eval mode (bitsandbytes' 8-bit layers compute otherwise in
    training mode)."""
    with torch.no_grad():
        return model.eval()(_probe(model))


def _probe(model: nn.Module) -> torch.Tensor:
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    network = getattr(network, "_orig_mod", network)  # torch.compile's wrapper
    return network.probe() if hasattr(type(network), "probe") else probe_inputs()


def fresh_base(method: Method) -> nn.Module:
    """The base model as the user has it before any adapter (the row's first-task adapter included, if any)."""
    L.seed_everything(0, verbose=False)
    return method.module().model


def plain(method: Method) -> nn.Module:
    """The row's plain network, as the module's model starts (the same seed)."""
    L.seed_everything(0, verbose=False)
    return method.network()


def plain_tinynet() -> nn.Module:
    L.seed_everything(0, verbose=False)
    return TinyNet()


# ----- the operations: each acts on a fitted row and returns (what it computes, what the model computes) -----
Operation = Callable[[Method, L.LightningModule, Path], tuple[torch.Tensor, torch.Tensor]]


def alone(model: nn.Module, adapter: str) -> nn.Module:
    """A copy of ``model`` computing with ``adapter`` alone: what a file of that one adapter holds."""
    from lightning_lora.core.composition.amlora import has_amlora, remove_amlora
    from lightning_lora.core.composition.xlora import has_xlora, remove_xlora

    single = copy.deepcopy(model)
    if has_xlora(single):
        remove_xlora(single)
    if has_amlora(single):
        remove_amlora(single)
    set_active_adapters(single, [adapter])
    return single


def quantized_like(method: Method, base: nn.Module) -> nn.Module:
    """``base`` with the layers the row's config quantises quantised the same way (what PEFT loads QLoRA onto)."""
    from lightning_lora.core.quantization.quantize import quantize_layers

    options = method.config().quantization if method.config is not None else None
    if options is not None:
        quantize_layers([base.get_submodule(name) for name in _targets()], options)
    return base


def peft_export(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import peft

    save_adapter(module.model, tmp / "adapter", method.exported)
    reloaded = peft.PeftModel.from_pretrained(quantized_like(method, plain(method)), tmp / "adapter")
    return outputs(reloaded), outputs(alone(module.model, method.exported))


def native_export(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Our file, loaded back the documented way (a quantised base rebuilt first: docs/qlora.md)."""
    save_adapter(module.model, tmp / "adapter", method.exported, format="lightning_lora")
    base = plain(method)
    config = read_adapter_config(tmp / "adapter", base)
    if config.quantization is not None:
        apply_lora(base, config, method.exported)
    reloaded = load_adapter(base, tmp / "adapter", method.exported)
    return outputs(reloaded), outputs(alone(module.model, method.exported))


def merge_and_unload_op(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    expected = outputs(module.model)
    return outputs(merge_and_unload(module.model)), expected


def unmerge(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    expected, weights = outputs(module.model), copy.deepcopy(module.model.state_dict())
    merge_lora(module.model)
    unmerge_lora(module.model)
    if not quantized_layers(module.model):  # a quantised base is re-quantised twice (the warned cell)
        for key, value in module.model.state_dict().items():
            assert_parity(value, weights[key])
    return outputs(module.model), expected


def save_merged(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    save_merged_model(module.model, tmp / "merged")
    base = plain(method)
    base.load_state_dict(load_file(tmp / "merged" / "model.safetensors"))
    return outputs(base), outputs(module.model)


def merge_on_fit_end(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    merged = fit(method, finish=False, merge_on_fit_end=True, merged_weights_dir=tmp / "merged")
    base = plain(method)
    base.load_state_dict(load_file(tmp / "merged" / "model.safetensors"))
    return outputs(base), outputs(merged.model)


def mixed_batch(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    names = [method.exported, "__base__", method.exported, "__base__", method.exported]
    with torch.no_grad(), mixed_adapter_batch(module.model, names):
        mixed = module.model(_probe(module.model))
    expected = outputs(alone(module.model, method.exported))
    with disable_adapters(module.model):
        expected[1::2] = outputs(module.model)[1::2]
    return mixed, expected


def compiled(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    expected = outputs(module.model)
    return outputs(torch.compile(module.model)), expected


def bf16_mixed(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    trained = fit(method, trainer_options={"precision": "bf16-mixed"})
    assert all(p.dtype == torch.float32 for n, p in trained.model.named_parameters() if p.requires_grad)
    assert torch.isfinite(outputs(trained.model)).all()
    return outputs(trained.model), outputs(trained.model)


def second_fit(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A second ``fit`` of the same module trains on (the adapter the model computes with, after ``finish``)."""
    before = outputs(module.model)
    if method.exported == method.adapter:
        callbacks = method.callbacks()
    else:
        config = get_lora_config(module.model, method.exported)
        callbacks = [LoraCallback(config, adapter_name=method.exported, submodule="model")]
    module.train()
    L.Trainer(**trainer_arguments(max_steps=2, callbacks=callbacks)).fit(module, method.data())
    after = outputs(module.eval().model)
    assert not torch.equal(after, before)  # it trained on
    return after, after


def resume(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A run that stops after step ``STEPS - 1`` (its checkpoint written mid-epoch), resumed to ``STEPS``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(tmp, "half", every_n_train_steps=STEPS - 1, save_top_k=-1)
    arguments = trainer_arguments(max_steps=STEPS - 1, callbacks=[*method.callbacks(), checkpoint])
    L.Trainer(**{**arguments, "enable_checkpointing": True}).fit(method.module(), method.data())
    L.seed_everything(0, verbose=False)
    resumed = method.module()
    trainer = L.Trainer(**trainer_arguments(max_steps=STEPS, callbacks=method.callbacks()))
    trainer.fit(resumed, method.data(), ckpt_path=tmp / "half.ckpt")
    if method.finish is not None:
        method.finish(resumed.model)
    return outputs(resumed.eval().model), outputs(module.model)


def trains(method: Method, module: L.LightningModule, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    after = outputs(module.model)
    assert torch.isfinite(after).all() and not torch.equal(after, outputs(fresh_base(method)))
    return after, after


OPERATIONS: dict[str, Operation] = {
    "fit": trains,
    "second fit": second_fit,
    "resume": resume,
    "PEFT export": peft_export,
    "native export": native_export,
    "merge_and_unload": merge_and_unload_op,
    "unmerge": unmerge,
    "merge_on_fit_end": merge_on_fit_end,
    "save_merged_model": save_merged,
    "mixed batch": mixed_batch,
    "torch.compile": compiled,
    "bf16-mixed": bf16_mixed,
}

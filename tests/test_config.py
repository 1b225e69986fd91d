"""One configuration: the API and ``lls train`` share TrainConfig's defaults and checks, and a run
is re-read with the values it was made with, whatever today's defaults are."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

import lls
from lls.cli import main
from lls.method.models import model_options
from lls.method.rules import LLS, RULES
from lls.options import option
from lls.training.rundir import RunDir

from .conftest import TINY_INPUT, tiny_net

TIMING_KEYS = ("train_seconds", "eval_seconds")
LIMIT = 400  # digits images: two batches of 128 and a smaller one, quick on any CPU


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_readme_api_and_lls_train_agree_to_the_last_digit(digits, tmp_path):
    """The README's Python API example, on the job `lls train --dataset digits --limit 400` runs,
    ends at the same metrics, every field of every epoch (both on the shared defaults)."""
    assert (
        main(["train", "--dataset", "digits", "--limit", str(LIMIT), "--quiet", "--out", str(tmp_path / "r")])
        == 0
    )
    (cli,) = records(tmp_path / "r")

    trainer = lls.build_trainer("smallconv", "lls", digits, rule_options={"basis": "square"}, seed=0)
    history = lls.fit(trainer, lls.Loaders.for_dataset(digits, limit=LIMIT), epochs=1, progress=False)
    (api,) = history.records
    api = {k: v for k, v in dataclasses.asdict(api).items() if k not in TIMING_KEYS}
    shared = set(api) & set(cli)
    assert {"test_accuracy", "test_loss", "train_loss", "block_losses"} <= shared
    assert {k: api[k] for k in shared} == {k: cli[k] for k in shared}


def cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("lls: error: ")


def test_the_api_refuses_bad_values_with_the_cli_message(capsys):
    lr = cli_error(capsys, ["train", "--dataset", "digits", "--lr", "-1"])
    with pytest.raises(lls.LLSError) as error:
        lls.Trainer(tiny_net(), input_shape=TINY_INPUT, lr=-1.0)
    assert str(error.value) == lr
    basis = cli_error(capsys, ["train", "--dataset", "digits", "--basis", "nope"])
    with pytest.raises(lls.LLSError) as error:
        lls.build_trainer("smallconv", "lls", (1, 8, 8), 10, rule_options={"basis": "nope"})
    assert str(error.value) == basis
    memory = cli_error(capsys, ["train", "--dataset", "digits", "--rule", "bp", "--memory", "low"])
    with pytest.raises(lls.LLSError) as error:
        lls.Trainer(tiny_net(), "bp", input_shape=TINY_INPUT, memory="low")
    assert str(error.value) == memory


def test_a_run_keeps_the_values_it_was_made_with(digits, tmp_path, monkeypatch):
    """config.json holds every option resolved; a default changed later does not change the run."""
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--limit", str(LIMIT), "--quiet", "--out", str(run)]
    assert main(argv) == 0
    written = json.loads((run / "config.json").read_text())["config"]
    assert written["rule_options"]["basis"] == "square" and written["rule_options"]["temperature"] == 0.5
    assert written["model_options"] == model_options({})  # every model option

    @dataclasses.dataclass
    class Changed(LLS):  # the same rule with other defaults
        basis: str = option("periodic", help="LLS basis")
        temperature: float = option(0.25, help="temperature", positive=True)

    monkeypatch.setitem(RULES._entries, "lls", Changed)
    assert lls.create_rule("lls").config()["basis"] == "periodic"  # the default did change
    config = RunDir.open(run).read_config()
    assert config.rule_options["basis"] == "square" and config.rule_options["temperature"] == 0.5
    assert config.rule_config()["basis"] == "square"
    # and the run resumes with them: another epoch is accepted as the same run
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["rule_options"] == written["rule_options"]
    assert len(records(run)) == 2


# A config.json's "config" as lls train wrote it before StepConfig existed (every key, flat)
OLD_CONFIG = {
    "dataset": "fashion-mnist",
    "model": "smallconv",
    "rule": "lls",
    "rule_options": {"basis": "square", "temperature": 0.5, "seed": 0, "readout_width": None},
    "model_options": {"dense_latent": "pooled", "depthwise_padding": "1", "block_granularity": "block"},
    "epochs": 1,
    "batch_size": 128,
    "lr": 0.005,
    "weight_decay": 0.0,
    "optimizer": "adamw-sf",
    "lr_schedule": "none",
    "seed": 0,
    "limit": 3000,
    "augment": None,
    "image_size": None,
    "channels_last": True,
    "holdout": None,
    "memory": None,
    "engine": "auto",
    "precision": "fp32",
}


def test_a_config_json_of_the_earlier_format_reads_and_writes_back_the_same_keys():
    """The step's options are StepConfig's fields, and config.json keeps them flat: a run directory
    written before reads back, and writes the same keys and values."""
    config = lls.training.config.TrainConfig.from_dict(dict(OLD_CONFIG))
    # model options added since (the width multiplier, the last latent of a residual network) are
    # written with their defaults, which the run was built with (smallconv takes neither)
    model_options = {**OLD_CONFIG["model_options"], "width": 1.0, "last_latent": "head"}
    assert config.as_dict() == {**OLD_CONFIG, "model_options": model_options}
    assert isinstance(config, lls.StepConfig)
    step = config.step_config()
    assert type(step) is lls.StepConfig
    assert dataclasses.asdict(step) == {
        f.name: OLD_CONFIG[f.name] for f in dataclasses.fields(lls.StepConfig)
    }


def test_the_step_options_are_one_config_however_given():
    """Keywords, a StepConfig, or both (the keywords win) give the trainer one StepConfig."""
    by_keywords = lls.Trainer(tiny_net(), input_shape=TINY_INPUT, lr=0.25, weight_decay=0.5)
    by_config = lls.Trainer(
        tiny_net(), input_shape=TINY_INPUT, config=lls.StepConfig(lr=0.25, weight_decay=0.5)
    )
    assert by_keywords.config == by_config.config == lls.StepConfig(lr=0.25, weight_decay=0.5)
    both = lls.Trainer(tiny_net(), input_shape=TINY_INPUT, config=lls.StepConfig(lr=0.25), lr=0.5)
    assert both.config.lr == 0.5 and both.optimizers[0].param_groups[0]["lr"] == 0.5
    with pytest.raises(lls.LLSError, match="unknown step options \\['learning_rate'\\]"):
        lls.Trainer(tiny_net(), input_shape=TINY_INPUT, learning_rate=0.1)
    with pytest.raises(lls.LLSError, match=r"--lr must be > 0, got -1\.0"):
        lls.StepConfig(lr=-1.0)
    with pytest.raises(lls.LLSError, match="unknown lr schedule 'linear'"):
        lls.build_trainer("smallconv", "lls", (1, 28, 28), 10, lr_schedule="linear")


def test_the_step_options_are_declared_once():
    """TrainConfig takes the step's fields from StepConfig (none declared twice), and lls train's
    --help lists the run's options before the step's."""
    from lls.training.config import CONFIG_OPTIONS, TrainConfig

    step = [f.name for f in dataclasses.fields(lls.StepConfig)]
    assert [f.name for f in dataclasses.fields(TrainConfig)][: len(step)] == step  # inherited
    assert "lr" not in inspect.get_annotations(TrainConfig)
    names = [f.name for f in CONFIG_OPTIONS]
    assert names[-len(step) :] == step and names[0] == "dataset"

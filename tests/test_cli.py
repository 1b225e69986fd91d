"""The command line as a user meets it: exit status and what it prints (in-process, through
``lls.cli.main``; tests/test_runs.py and tests/test_distributed.py cross real process boundaries)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lls.cli import main
from lls.data.mnist import SPLIT_FILES

from .idx_files import write_idx


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run ``lls ARGV``; it must end with status 2 and one ``lls: error:`` line holding ``fragments``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lls: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_names_list_the_known_ones(capsys):
    one_line_error(capsys, ["train", "--rule", "hebb"], "unknown rule 'hebb'", "known rules: bp, dfa")
    one_line_error(capsys, ["train", "--model", "resnet"], "unknown model 'resnet'", "smallconv")
    one_line_error(capsys, ["train", "--dataset", "svhn"], "unknown dataset 'svhn'", "fashion-mnist")
    one_line_error(capsys, ["train", "--basis", "wavelet"], "unknown basis 'wavelet'", "known bases")


def test_missing_dataset_directory(tmp_path, capsys):
    one_line_error(capsys, ["train", "--data-dir", str(tmp_path / "missing")], "does not exist", "--data-dir")


def test_truncated_idx_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for key, stem in SPLIT_FILES.items():
        n = 60_000 if key.startswith("train") else 10_000
        shape = (n, 28, 28) if key.endswith("images") else (n,)
        write_idx(tmp_path / stem, rng.integers(0, 10, shape, dtype=np.uint8))
    images = tmp_path / SPLIT_FILES["train_images"]
    images.write_bytes(images.read_bytes()[: 16 + 784 * 100])
    argv = ["train", "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "run")]
    one_line_error(capsys, argv, "train-images-idx3-ubyte is truncated", "fetch it again")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_rule_option_that_does_not_apply(capsys):
    one_line_error(
        capsys,
        ["train", "--rule", "bp", "--basis", "square"],
        "rule 'bp' has no option --basis",
        "lls, lls-m",
    )


def test_feedback_kind_reaches_the_rule_and_the_run_config(digits, tmp_path, capsys):
    out = tmp_path / "drtp"
    args = ["train", "--dataset", "digits", "--rule", "drtp", "--limit", "256", "--quiet", "--out", str(out)]
    assert main([*args, "--feedback", "centred"]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["rule_options"]["feedback"] == "centred"
    capsys.readouterr()
    # a resume may not change it, but may repeat it, or any default it ran with
    resume = ["train", "--resume", str(out), "--epochs", "2"]
    one_line_error(capsys, [*resume, "--feedback", "uniform"], "--feedback uniform (the run has centred)")
    assert main([*resume, "--feedback", "centred", "--batch-size", "128", "--quiet"]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["train", "--rule", "lls", "--feedback", "centred"], "no option --feedback")


@pytest.mark.parametrize("rule", ["bp", "local-classifier", "lls"])
def test_seed_is_the_runs_for_every_rule_with_or_without_random_tensors(rule, digits, tmp_path, capsys):
    """--seed seeds the run (weights, shuffling); a rule that draws fixed tensors records it too,
    and one that draws none (bp) takes the flag all the same."""
    out = tmp_path / rule
    args = ["train", "--dataset", "digits", "--rule", rule, "--limit", "64", "--quiet", "--out", str(out)]
    assert main([*args, "--seed", "3", "--no-block-accuracy"]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["seed"] == 3
    assert config["rule_options"].get("seed", 3) == 3


def test_json_summary_is_the_last_line(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory is ./runs/NAME
    assert (
        main(["train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--json", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("test_accuracy", "best_test_accuracy", "epochs", "train_seconds", "rule", "model", "dataset"):
        assert key in summary
    assert 0.5 < summary["test_accuracy"] <= summary["best_test_accuracy"] <= 1
    assert (summary["rule"], summary["model"], summary["dataset"], summary["epochs"]) == (
        "lls",
        "smallconv",
        "digits",
        2,
    )
    assert "epoch 2/2" in out
    assert Path(summary["run_dir"]).parent == Path("runs") and (tmp_path / summary["run_dir"]).is_dir()


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lls-mxm" in out and "mobilenetv1" in out and "adamw-sf" in out


def test_every_command_and_option_has_a_help_text(capsys):
    import argparse

    from lls.cli import build_parser

    def subcommands(parser):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return actions[0] if actions else None

    commands = subcommands(build_parser())
    assert {a.dest for a in commands._choices_actions} == set(commands.choices)  # a line each in `lls --help`
    assert all(a.help for a in commands._choices_actions)
    parsers = list(commands.choices.items())
    while parsers:
        name, parser = parsers.pop()
        nested = subcommands(parser)  # lls data fetch|check, lls plot basis
        if nested is not None:
            assert all(a.help for a in nested._choices_actions)
            parsers += [(f"{name} {n}", p) for n, p in nested.choices.items()]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"lls {name}: {action.option_strings or action.dest} has no help"


def test_a_new_rule_option_appears_on_the_command_line_by_itself(monkeypatch):
    """Declaring a field on a rule is all it takes: flag, help and check come from it."""
    import dataclasses

    from lls.cli import build_parser
    from lls.method.rules import LLS, RULES
    from lls.options import option

    @dataclasses.dataclass
    class Sharper(LLS):
        sharpness: float = option(1.0, help="how sharp the scores are", positive=True)

    Sharper.name = "sharper"
    monkeypatch.setitem(RULES._entries, "sharper", Sharper)
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--sharpness" in help_text and "how sharp the scores are" in help_text
    with pytest.raises(Exception, match="--sharpness must be > 0"):
        from lls.training.config import config_from_options

        config_from_options({"rule": "sharper"}, {"sharpness": -1.0})


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--epochs", "many"], "invalid int value"),
        (["train", "--lr", "1e200"], "--lr must be <= 1000"),
        (["train", "--lr", "nan"], "--lr must be a finite number"),
        (["train", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["train", "--seed", "99999999999999999999999"], "--seed must be <="),
        (["train", "--temperature", "0"], "--temperature must be > 0"),
        (["train", "--temperature", "abc"], "invalid float value"),
        (["train", "--batch-size", "-3"], "--batch-size must be >= 1"),
        (["train", "--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["train", "--device", "tpu"], "unknown device"),
        (["train", "--stages", "0-1"], "--stages goes with --parallel pipeline"),
        (["train", "--resume", "/nonexistent/run"], "does not exist"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["train", "--dense-latent", "wide"], "unknown dense_latent 'wide'; known dense latents: pooled"),
        (["train", "--engine", "warp"], "unknown engine 'warp'"),
        (["train", "--engine", "graph", "--device", "cpu"], "engine 'graph' captures CUDA graphs"),
        (["train", "--memory", "lots"], "neither 'low' nor a size"),
        (["train", "--rule", "bp", "--memory", "low"], "drop --memory or pick a local rule"),
        (["eval", "/nonexistent/run"], "does not exist"),
        (["eval"], "the following arguments are required: run"),
        (["data", "check", "svhn"], "unknown dataset"),
        (["data", "fetch", "vww"], "docs/datasets.md"),
        (["data", "check", "digits", "--sample", "0"], "--sample must be at least 1"),
        (["cost", "--model", "vgg8"], "--input C,H,W"),
        (["cost", "--input", "3,32", "--classes", "10"], "--input takes C,H,W"),
        (["cost", "--dataset", "digits", "--rule", "lls:temperature=abc"], "temperature must be a number"),
        (["cost", "--dataset", "digits", "--rule", "lls:basis"], "key=value"),
        (["cost", "--dataset", "digits", "--rule", "hebb"], "unknown rule 'hebb'"),
        (["bench", "--dataset", "digits", "--rules", "lls,hebb"], "unknown rule 'hebb'"),
        (["bench", "--dataset", "digits", "--steps", "0"], "--steps must be at least 1"),
        (["bench", "--dataset", "digits", "--rules", "lls@warp"], "unknown engine 'warp'"),
        (["bench", "--dataset", "digits", "--memory", "0MiB"], "--memory"),
        (
            ["cost", "--dataset", "digits", "--rule", "bp", "--memory", "low"],
            "bp back-propagates through every block at once; drop --memory",
        ),
        (["cost", "--dataset", "digits", "--depthwise-padding", "7"], "known paddings: 1, stride"),
        (["reproduce"], "name the experiments"),
        (["reproduce", "table9"], "known: table1, table2, table3, compare"),
        (["reproduce", "table1", "--seeds", "a,b"], "comma-separated whole numbers"),
        (["report"], "the following arguments are required: runs"),
        (["report", "/nonexistent/runs"], "does not exist"),
        (["diagnose", "/nonexistent/run"], "does not exist"),
        (["plot", "basis", "--kind", "triangle"], "invalid choice: 'triangle'"),
        (["plot", "basis", "--classes", "1"], "--classes must be at least 2"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["train", "--epochs", "99999999999999999999"], "--epochs must be <= 100000"),
        (["train", "--batch-size", "99999999999"], "--batch-size must be <="),
        (["train", "--limit", "99999999999999999999"], "--limit must be <="),
        (["train", "--resume", ""], "run directory is an empty path"),
        (["eval", ""], "run directory is an empty path"),
        (["report", ""], "run folder is an empty path"),
        (["cost", "--dataset", "digits", "--batch", "1"], "at least 2 (BatchNorm needs 2 images"),
        (["bench", "--dataset", "digits", "--batch", "1"], "at least 2 (BatchNorm needs 2 images"),
        (["bench", "--dataset", "digits", "--threads", "100000"], "cores this process may use"),
        (["bench", "--dataset", "digits", "--steps", "99999999999"], "--steps must be at most"),
        (["cost", "--input", "1,28,28", "--classes", "100000000"], "--classes must be at most"),
        (["plot", "basis", "--dim", "99999999999"], "--dim must be at most"),
        (["plot", "basis", "--out", "b.jpg"], "b.jpg has another suffix: give a file name ending in .png"),
        (["cost", "--dataset", "digits", "--memory", "1KiB"], "budget of 1 KiB is below the smallest step"),
        (["train", "--dataset", "digits", "--memory", "1KiB"], "budget of 1 KiB is below the smallest step"),
    ],
)
def test_bad_arguments_end_in_one_line(argv, fragment, capsys):
    one_line_error(capsys, argv, fragment)


def test_module_and_console_script_agree():
    """The one real interpreter start of this file: the installed script and `python -m lls`."""
    script = Path(sys.executable).parent / "lls"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("lls ")

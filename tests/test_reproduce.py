"""Presets of the paper's tables, the resumable sweep and the report."""

import json

import pytest

import lls
from lls.cli import main
from lls.training.presets import PRESETS, Preset, select

pytestmark = pytest.mark.usefixtures("digits")


def test_table1_is_the_basis_ablation():
    rows = select("table1")
    assert len(rows) == 4 * 2 * 3
    assert {p.rule_options["basis"] for p in rows} == {"random", "periodic", "square"}
    vgg_long = {(p.dataset, p.epochs, p.augment) for p in rows if p.model == "vgg8"}
    assert ("cifar10", 300, "aug") in vgg_long and ("imagenette", 300, "aug") in vgg_long
    assert ("mnist", 100, None) in vgg_long
    small = {(p.dataset, p.augment) for p in rows if p.model == "smallconv"}
    assert ("cifar10", "basic") in small and ("imagenette", "basic") in small


def test_table2_and_table3_rows():
    t2 = select("table2")
    assert {(p.dataset, p.rule) for p in t2} == {
        (d, r) for d in ("mnist", "cifar10", "cifar100") for r in ("bp", "dfa", "lls")
    }
    assert all(p.model == "smallconvl" and p.epochs == 100 for p in t2)
    t3 = select("table3")
    assert {p.dataset for p in t3} == {"cifar10", "cifar100", "imagenette", "tinyimagenet", "vww"}
    assert all(p.model == "vgg8" and p.epochs == 300 for p in t3)
    reduced = [p for p in t3 if p.rule_options.get("reduced")]
    assert {p.dataset for p in reduced} == {"cifar100", "tinyimagenet"} and reduced[0].rule_options[
        "reduced"
    ] == 100


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_names_registered_things(preset):
    config = preset.config(seed=3)
    lls.create_rule(config.rule, **config.rule_options)
    assert config.model in lls.list_models() and config.dataset in lls.list_datasets()
    assert config.batch_size == 128 and config.lr == 5e-3 and config.optimizer == "adamw-sf"
    assert len({p.name for p in PRESETS}) == len(PRESETS)


@pytest.mark.slow  # 4 runs, a report with figures, 4 resumed runs
def test_sweep_skips_finished_rows_and_reports_mean_and_std(tmp_path, monkeypatch, capsys):
    tiny = (
        Preset("compare", "digits", "smallconv", "bp", "BP", 2),
        Preset("compare", "digits", "smallconv", "lls", "LLS (square)", 2, None, {"basis": "square"}),
    )
    monkeypatch.setattr("lls.training.presets.PRESETS", tiny)
    out = tmp_path / "sweep"
    args = ["reproduce", "compare", "--dataset", "digits", "--seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--report"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done:") == 4 and "running:" not in printed
    report = json.loads((out / "report-compare" / "report.json").read_text())
    assert {r["rule"] for r in report} == {"bp", "lls (square)"}
    row = next(r for r in report if r["rule"] == "lls (square)")
    assert row["seeds"] == [0, 1] and len(row["final"]) == 2 and row["extra_params"] == 0
    assert row["signal_mults"] > 0 and row["activation_bytes"] > 0
    markdown = (out / "report-compare" / "report.md").read_text()
    assert "±" in markdown and "digits-smallconv.png" in markdown
    assert (out / "report-compare" / "digits-smallconv.png").exists()
    # per-block accuracy: each seed's curve of (epoch x block), read out as each rule does
    assert row["readout"] == "basis" and [len(c) for c in row["block_curves"]] == [2, 2]
    assert len(row["block_curves"][0][-1]) == 4 and all(0 <= a <= 1 for a in row["block_curves"][0][-1])
    assert next(r for r in report if r["rule"] == "bp")["readout"] == "ridge probe"
    assert (out / "report-compare" / "blocks-digits-smallconv.png").exists()
    # more epochs later: the finished rows resume instead of starting over
    assert main([*args, "--epochs", "3"]) == 0
    assert capsys.readouterr().out.count("running:") == 4
    assert len((out / "compare" / "digits-smallconv-bp-s0" / "metrics.jsonl").read_text().splitlines()) == 3


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_unknown_table(capsys):
    assert main(["reproduce", "table9"]) == 2
    assert "known: table1, table2, table3, compare" in capsys.readouterr().err


@pytest.mark.slow  # six runs and a report with figures
def test_report_rows_merge_seeds_and_nothing_else(tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ["train", "--dataset", "digits", "--limit", "256", "--batch-size", "64", "--quiet"]
    for name, extra in {
        "s0": ["--seed", "0"],
        "s1": ["--seed", "1"],
        "t25": ["--temperature", "0.25"],
        "t50": ["--temperature", "0.5"],  # the default, said explicitly: the same row as s0 and s1
        "held": ["--holdout", "64"],
        "long": ["--epochs", "2"],
    }.items():
        assert main([*base, *extra, "--out", str(runs / name)]) == 0
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    found = sorted((r["dataset"], r["rule"], r["epochs"], r["seeds"]) for r in rows)
    assert found == [  # every row says what sets it apart from the defaults (here also batch and limit)
        ("digits", "lls (square) batch_size=64 limit=256", 1, [0, 0, 1]),
        ("digits", "lls (square) batch_size=64 limit=256", 2, [0]),
        ("digits", "lls (square) temperature=0.25 batch_size=64 limit=256", 1, [0]),
        ("digits (holdout 64)", "lls (square) batch_size=64 limit=256", 1, [0]),
    ]


def test_a_model_option_sets_a_report_row_apart_and_its_default_does_not():
    from pathlib import Path

    from lls.training.config import TrainConfig
    from lls.training.report import RunResult

    def label(**model_options):
        config = TrainConfig(model="smallconvl", model_options=model_options)
        return RunResult(Path("run"), config, [], {}).label

    assert label() == label(dense_latent="pooled") == "lls (square)"
    assert label(dense_latent="output") == "lls (square) dense_latent=output"

"""The command line as a user meets it: a subprocess, its exit status and what it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lls.data.idx import write_idx
from lls.data.mnist import SPLIT_FILES


def lls_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lls", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("lls: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_rule():
    assert_one_line_error(lls_cli("train", "--rule", "hebb"), "unknown rule 'hebb'", "known rules: bp, dfa")


def test_unknown_model():
    assert_one_line_error(lls_cli("train", "--model", "resnet"), "unknown model 'resnet'", "smallconv")


def test_unknown_dataset():
    assert_one_line_error(lls_cli("train", "--dataset", "svhn"), "unknown dataset 'svhn'", "fashion-mnist")


def test_missing_dataset_directory(tmp_path):
    result = lls_cli("train", "--data-dir", str(tmp_path / "missing"))
    assert_one_line_error(result, "does not exist", "--data-dir")


def test_truncated_idx_file(tmp_path):
    rng = np.random.default_rng(0)
    for key, stem in SPLIT_FILES.items():
        n = 60_000 if key.startswith("train") else 10_000
        shape = (n, 28, 28) if key.endswith("images") else (n,)
        write_idx(tmp_path / stem, rng.integers(0, 10, shape, dtype=np.uint8))
    images = tmp_path / SPLIT_FILES["train_images"]
    images.write_bytes(images.read_bytes()[: 16 + 784 * 100])
    result = lls_cli("train", "--data-dir", str(tmp_path), "--no-download")
    assert_one_line_error(result, "train-images-idx3-ubyte is truncated", "fetch it again")


def test_rule_option_that_does_not_apply():
    assert_one_line_error(
        lls_cli("train", "--rule", "bp", "--basis", "square"), "rule 'bp' has no option 'basis'"
    )


def test_feedback_kind_reaches_the_rule_and_the_run_config(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "drtp"
    args = ("train", "--dataset", "digits", "--rule", "drtp", "--limit", "256", "--quiet", "--out", str(out))
    result = lls_cli(*args, "--feedback", "centred")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["rule_options"]["feedback"] == "centred"
    # a resume may not change it
    resumed = lls_cli("train", "--resume", str(out), "--feedback", "uniform", "--epochs", "2")
    assert_one_line_error(resumed, "--feedback uniform (the run has centred)")
    assert_one_line_error(
        lls_cli("train", "--rule", "lls", "--feedback", "centred"), "rule 'lls' has no option 'feedback'"
    )


def test_json_summary_is_the_last_line(tmp_path):
    pytest.importorskip("sklearn")
    result = lls_cli(
        "train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--json", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("test_accuracy", "best_test_accuracy", "epochs", "train_seconds", "rule", "model", "dataset"):
        assert key in summary
    assert 0.5 < summary["test_accuracy"] <= summary["best_test_accuracy"] <= 1
    assert (summary["rule"], summary["model"], summary["dataset"], summary["epochs"]) == (
        "lls",
        "smallconv",
        "digits",
        2,
    )
    assert "epoch 2/2" in result.stdout


def test_list():
    result = lls_cli("list")
    assert result.returncode == 0
    assert "lls-mxm" in result.stdout and "mobilenetv1" in result.stdout


def test_module_and_console_script_agree():
    script = Path(sys.executable).parent / "lls"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("lls ")

"""A run is a directory: checkpoints, resume (also after kill -9 and Ctrl-C), errors, eval."""

import contextlib
import importlib.util
import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch

import lls
from lls.cli import main
from lls.training.rundir import load_checkpoint_file

from .processes import lls as spawn
from .processes import wait_for

pytestmark = pytest.mark.usefixtures("digits")
TIMING_KEYS = ("train_seconds", "eval_seconds")
DIGITS_RUN = ["train", "--dataset", "digits", "--batch-size", "32", "--quiet"]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(run / "checkpoint.pt")["trainer"]["net"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run that the interrupted ones must match exactly."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert main([*DIGITS_RUN, "--epochs", "3", "--out", str(out)]) == 0
    return out


def test_run_directory_contents(reference):
    config = json.loads((reference / "config.json").read_text())
    assert config["config"]["seed"] == 0 and config["config"]["epochs"] == 3
    assert config["lls_version"] == lls.__version__ and config["torch_version"] == torch.__version__
    rows = metrics(reference)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and len(rows[0]["block_losses"]) == 4
    header = (reference / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy"]
    assert "block_3_loss" in header and header[-1] == "block_3_accuracy"
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint_file(reference / "checkpoint.pt")
    assert state["epoch"] == 3 and state["progress"] is None and len(state["trainer"]["optimizers"]) == 5
    assert "exp_avg_sq" in next(
        iter(state["trainer"]["optimizers"][0]["state"].values())
    )  # schedule-free state


def test_resume_continues_to_the_same_metrics(reference, tmp_path):
    out = tmp_path / "run"
    assert main([*DIGITS_RUN, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    assert metrics(out) == metrics(reference)
    for name, tensor in final_weights(reference).items():
        assert torch.equal(tensor, final_weights(out)[name]), name
    # config.json now describes the 3-epoch run, and records the extension
    record = json.loads((out / "config.json").read_text())
    assert record["config"] == json.loads((reference / "config.json").read_text())["config"]
    assert [r["epochs"] for r in record["resumed"]] == [[1, 3]] and "commit" in record["resumed"][0]


@pytest.mark.slow  # a real process killed mid-run, then resumed
def test_kill_9_at_any_moment_then_resume(reference, tmp_path):
    out = tmp_path / "run"
    process = spawn(*DIGITS_RUN, "--epochs", "3", "--out", str(out))
    wait_for(out / "checkpoint.pt", [process])
    time.sleep(0.15)  # somewhere in epoch 2 (or writing its checkpoint)
    process.signal(signal.SIGKILL)
    assert process.finish()[0] == -signal.SIGKILL
    (out / ".checkpoint.pt.half-written.tmp").write_bytes(b"\x80\x02partial")  # what a kill mid-write leaves
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert metrics(out) == metrics(reference)


@pytest.mark.slow  # a real process interrupted, then resumed (the in-process stop is tested below)
def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    process = spawn(*DIGITS_RUN, "--epochs", "3", "--out", str(out))
    wait_for(out / "curves.png", [process])  # written last after epoch 1
    time.sleep(0.05)
    process.signal(signal.SIGINT)
    code, _, stderr = process.finish()
    if code == 0:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert code == 130, stderr
    assert "lls train --resume" in stderr and "Traceback" not in stderr
    state = load_checkpoint_file(out / "checkpoint.pt")
    assert state["progress"] is None or state["progress"]["step"] > 0
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert metrics(out) == metrics(reference)


def test_stop_mid_epoch_saves_the_partial_epoch_and_resumes_exactly(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    polls = {"n": 0}

    @contextlib.contextmanager
    def stop_after_60_steps():
        def should_stop():
            polls["n"] += 1
            return polls["n"] > 60

        yield should_stop

    monkeypatch.setattr("lls.training.run.graceful_interrupt", stop_after_60_steps)
    assert main([*DIGITS_RUN, "--epochs", "3", "--out", str(out)]) == 130
    state = load_checkpoint_file(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["progress"]["epoch"] == 1 and state["progress"]["step"] == 60 - 45
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert metrics(out) == metrics(reference)


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = lls.Trainer.train_step
    calls = {"n": 0}

    def poisoned(self, x, y):
        result = original(self, x, y)
        calls["n"] += 1
        if calls["n"] == 45 + 7:  # epoch 2 (45 steps per epoch), its 7th step
            result.block_losses[2] = float("nan")
        return result

    monkeypatch.setattr(lls.Trainer, "train_step", poisoned)
    assert main([*DIGITS_RUN, "--epochs", "3", "--out", str(out)]) == 3
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged at epoch 2, step 7: block 2's local loss is nan" in error
    assert "last good checkpoint (epoch 1)" in error
    assert load_checkpoint_file(out / "checkpoint.pt")["epoch"] == 1
    assert len(metrics(out)) == 1


def test_an_existing_run_is_never_overwritten(reference, capsys):
    before = (reference / "config.json").read_bytes()
    assert main([*DIGITS_RUN, "--out", str(reference)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (reference / "config.json").read_bytes() == before


def test_resume_with_another_config_is_refused(reference, capsys):
    assert main(["train", "--resume", str(reference), "--lr", "0.1", "--model", "vgg8"]) == 2
    error = capsys.readouterr().err
    assert "--lr 0.1 (the run has 0.005)" in error and "--model vgg8 (the run has smallconv)" in error


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None, "pickle"])
def test_a_checkpoint_that_is_not_ours(tmp_path, content, capsys):
    out = tmp_path / "run"
    assert main([*DIGITS_RUN, "--epochs", "1", "--out", str(out)]) == 0
    marker = tmp_path / "code-ran"
    if content is None:
        torch.save({"model": torch.zeros(3)}, out / "checkpoint.pt")
    elif content == "pickle":

        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))

        (out / "checkpoint.pt").write_bytes(
            pickle.dumps({"format": "lls-checkpoint", "x": Payload()}, protocol=2)
        )
    else:
        (out / "checkpoint.pt").write_bytes(content)
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert not marker.exists()  # loading never executes code from the file


def test_eval_reproduces_the_last_test_accuracy(reference, capsys):
    assert main(["eval", str(reference), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == metrics(reference)[-1]["test_accuracy"]
    assert result["loss"] == pytest.approx(metrics(reference)[-1]["test_loss"], rel=1e-6)


def test_eval_on_a_dataset_of_another_shape_is_refused(reference, capsys):
    assert main(["eval", str(reference), "--dataset", "cifar10", "--no-download"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_impossible_model_for_the_input_size(tmp_path, capsys):
    assert main([*DIGITS_RUN, "--model", "vgg11", "--out", str(tmp_path / "r")]) == 2
    assert "vgg11 cannot take inputs of shape (1, 8, 8)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard (the dev extras install it)"
)
def test_tensorboard_logs_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    assert main([*DIGITS_RUN, "--limit", "200", "--epochs", "2", "--tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = metrics(out)
    accuracy = events.Scalars("test_accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["test_accuracy"] for r in rows])
    assert len(events.Scalars("block_loss/3")) == 2


def test_data_check_and_fetch_commands(capsys):
    assert main(["data", "check", "digits"]) == 0
    assert "train: 1438 images" in capsys.readouterr().out
    assert main(["data", "fetch", "vww"]) == 2
    assert "docs/datasets.md" in capsys.readouterr().err


def test_checkpoint_leaves_no_temp_files(reference):
    assert not [p for p in os.listdir(reference) if p.endswith(".tmp")]


def test_holdout_evaluates_on_training_images_the_run_never_trains_on(tmp_path, capsys):
    from lls.training.config import TrainConfig
    from lls.training.run import build_session

    session = build_session(TrainConfig(dataset="digits", holdout=300), device=torch.device("cpu"))
    full = lls.load_dataset("digits")
    assert len(session.data.train) == len(full.train) - 300 and len(session.data.test) == 300
    train_rows = {tuple(x.flatten().tolist()) for x in session.data.train.images}
    held_rows = [tuple(x.flatten().tolist()) for x in session.data.test.images]
    assert sum(r in train_rows for r in held_rows) <= 3  # digits has a few duplicate images, no more
    again = build_session(TrainConfig(dataset="digits", holdout=300, seed=5), device=torch.device("cpu"))
    assert torch.equal(again.data.test.labels, session.data.test.labels)  # fixed, whatever the seed
    assert main([*DIGITS_RUN, "--holdout", "300", "--out", str(tmp_path / "r")]) == 0
    assert "(1138 train / 300 test" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["holdout"] == 300

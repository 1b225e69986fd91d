"""Data-parallel and pipelined training on torch.distributed (gloo, 2 local processes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lls.distributed import balance_stages, parse_stages
from lls.errors import LLSError
from lls.run import load_checkpoint_file

HERE = Path(__file__).parent
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int, **env) -> list[subprocess.Popen]:
    """Start ``world`` processes the way torchrun would (its environment variables, 1 thread each)."""
    port = free_port()
    procs = []
    for rank in range(world):
        environment = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        procs.append(
            subprocess.Popen(argv, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        results.append((p.returncode, out, err))
    return results


def single(argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    return subprocess.run(
        argv, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT
    )


LLS = [sys.executable, "-m", "lls"]
DIGITS = ["train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--quiet"]


@pytest.mark.parametrize("rule", ["lls", "drtp"])
def test_two_stage_pipeline_is_the_same_algorithm(rule, tmp_path):
    pytest.importorskip("sklearn")
    reference = tmp_path / "single"
    done = single([*LLS, *DIGITS, "--rule", rule, "--out", str(reference)])
    assert done.returncode == 0, done.stderr
    piped = tmp_path / "pipeline"
    results = finish(
        launch([*LLS, *DIGITS, "--rule", rule, "--out", str(piped), "--parallel", "pipeline"], 2)
    )
    assert [r[0] for r in results] == [0, 0], results[0][2] + results[1][2]
    a = load_checkpoint_file(reference / "checkpoint.pt")
    b = load_checkpoint_file(piped / "checkpoint.pt")
    for name, tensor in a["trainer"]["net"].items():
        assert torch.equal(tensor, b["trainer"]["net"][name]), name  # bit for bit
    keep = ("train_loss", "block_losses", "test_accuracy", "block_accuracy")
    assert [{k: r[k] for k in keep} for r in a["history"]] == [{k: r[k] for k in keep} for r in b["history"]]
    assert not (piped / "rank1").exists() and sorted(p.name for p in piped.iterdir()) == sorted(
        p.name for p in reference.iterdir()
    )


@pytest.mark.parametrize("rule", ["lls", "bp", "local-classifier"])
def test_data_parallel_equals_one_process_on_the_combined_batch(rule, tmp_path):
    worker = [sys.executable, str(HERE / "dist_worker.py"), rule]
    done = single([*worker, str(tmp_path / "single.pt")])
    assert done.returncode == 0, done.stderr
    results = finish(launch([*worker, str(tmp_path / "ddp.pt")], 2))
    assert [r[0] for r in results] == [0, 0], results[0][2] + results[1][2]
    a, b = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_data_parallel_run_directory_is_written_by_rank_0(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "ddp"
    results = finish(launch([*LLS, *DIGITS, "--out", str(out), "--parallel", "ddp", "--json"], 2))
    assert [r[0] for r in results] == [0, 0], results[0][2]
    summary = json.loads(results[0][1].strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.8 and results[1][1] == ""  # rank 1 prints nothing
    config = json.loads((out / "config.json").read_text())
    assert config["parallel"] == "ddp" and config["world_size"] == 2
    # resume works the same way
    results = finish(
        launch([*LLS, "train", "--resume", str(out), "--epochs", "3", "--quiet", "--parallel", "ddp"], 2)
    )
    assert [r[0] for r in results] == [0, 0], results[0][2]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_data_parallel_ctrl_c_mid_epoch_resumes_to_the_same_metrics(tmp_path):
    pytest.importorskip("sklearn")
    argv = [*LLS, *DIGITS[:3], "--epochs", "3", "--batch-size", "8", "--quiet", "--parallel", "ddp"]
    reference = tmp_path / "reference"
    assert [r[0] for r in finish(launch([*argv, "--out", str(reference)], 2))] == [0, 0]
    out = tmp_path / "run"
    procs = launch([*argv, "--out", str(out)], 2)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "curves.png").exists():  # written last after epoch 1
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGINT)
    results = finish(procs)
    if [r[0] for r in results] == [0, 0]:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert [r[0] for r in results] == [130, 130], results[0][2] + results[1][2]
    resumed = finish(launch([*LLS, "train", "--resume", str(out), "--quiet", "--parallel", "ddp"], 2))
    assert [r[0] for r in resumed] == [0, 0], resumed[0][2] + resumed[1][2]

    def metrics(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [[r["train_loss"], r["train_accuracy"], *r["block_losses"], r["test_accuracy"]] for r in rows]

    # the epoch's sums saved mid-epoch are global: counted once, not once per rank (which would
    # double the interrupted epoch's loss); the all-reduce sums them in another order, hence approx
    assert metrics(out) == [pytest.approx(r, rel=1e-6) for r in metrics(reference)]


def test_a_killed_rank_makes_the_others_stop_with_a_clear_error(tmp_path):
    pytest.importorskip("sklearn")
    argv = [
        *LLS,
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "200",
        "--batch-size",
        "16",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
        "--parallel",
        "pipeline",
    ]
    procs = launch(argv, 2)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "run" / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    assert time.monotonic() - start < 60
    assert procs[0].returncode != 0
    assert "lost contact with the other ranks" in err and "Traceback" not in err


@pytest.mark.parametrize("rule", ["bp", "dfa"])
def test_pipeline_refuses_rules_that_send_messages_backwards(rule, tmp_path):
    results = finish(
        launch([*LLS, *DIGITS, "--rule", rule, "--out", str(tmp_path / "r"), "--parallel", "pipeline"], 2)
    )
    assert all(code == 2 for code, _, _ in results)
    assert "needs messages travelling backwards" in results[0][2]


def test_parallel_without_torchrun_says_how_to_launch(tmp_path):
    done = single([*LLS, *DIGITS, "--out", str(tmp_path / "r"), "--parallel", "ddp"])
    assert done.returncode == 2 and "torchrun --nproc-per-node" in done.stderr


def test_balanced_stages_minimise_the_largest_stage():
    assert balance_stages([5, 1, 1, 1, 5, 1], 2) == [range(0, 3), range(3, 6)]  # 7 and 7
    assert balance_stages([1, 1, 1, 10], 2) == [range(0, 3), range(3, 4)]
    assert balance_stages([3, 3, 3], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(LLSError, match="only 2 blocks"):
        balance_stages([1, 1], 3)


def test_explicit_stages_are_checked():
    assert parse_stages("0-2,3-5,6-6", 7) == [range(0, 3), range(3, 6), range(6, 7)]
    with pytest.raises(LLSError, match=r"cover blocks 0\.\.6 once each"):
        parse_stages("0-2,4-6", 7)
    with pytest.raises(LLSError, match="ranges of block numbers"):
        parse_stages("a-b", 7)

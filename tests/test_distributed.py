"""Data-parallel and pipelined training on torch.distributed (gloo, 2 local processes)."""

import json

import pytest
import torch

from lls.cli import main
from lls.errors import LLSError
from lls.training.pipeline import balance_stages, parse_stages
from lls.training.rundir import load_checkpoint_file

from . import dist_worker
from .processes import SIGINT, finish, lls, lls_torchrun, start, torchrun, wait_for

pytestmark = pytest.mark.usefixtures("digits")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as every process torchrun starts here
# 640 of the 1,437 training images: 10 steps an epoch, enough for two stages to overlap
DIGITS = ["train", "--dataset", "digits", "--limit", "640", "--epochs", "2", "--batch-size", "64", "--quiet"]


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [[r["train_loss"], r["train_accuracy"], *r["block_losses"], r["test_accuracy"]] for r in rows]


# Each case starts three real processes: one rule in the fast suite, the other in the slow one
@pytest.mark.parametrize("rule", ["lls", pytest.param("drtp", marks=pytest.mark.slow)])
def test_two_stage_pipeline_is_the_same_algorithm(rule, tmp_path):
    reference, piped = tmp_path / "single", tmp_path / "pipeline"
    single = lls(*DIGITS, "--rule", rule, "--out", str(reference), env=ONE_THREAD)  # as each stage
    stages = lls_torchrun(*DIGITS, "--rule", rule, "--out", str(piped), "--parallel", "pipeline")
    assert single.finish()[0] == 0
    results = finish(stages)
    assert [r[0] for r in results] == [0, 0], results[0][2] + results[1][2]
    a = load_checkpoint_file(reference / "checkpoint.pt")
    b = load_checkpoint_file(piped / "checkpoint.pt")
    for name, tensor in a["trainer"]["net"].items():
        assert torch.equal(tensor, b["trainer"]["net"][name]), name  # bit for bit
    keep = ("train_loss", "block_losses", "test_accuracy", "block_accuracy")
    assert [{k: r[k] for k in keep} for r in a["history"]] == [{k: r[k] for k in keep} for r in b["history"]]
    assert all(len(r["stage_busy"]) == 2 for r in b["history"])
    assert sorted(p.name for p in piped.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_data_parallel_equals_one_process_on_the_combined_batch(tmp_path):
    rules = ["lls", "bp", "local-classifier"]
    single = start(dist_worker.train, rules, str(tmp_path / "single.pt"), env=ONE_THREAD)
    results = finish(torchrun(dist_worker.train, rules, str(tmp_path / "ddp.pt")))
    assert single.finish()[0] == 0
    assert [r[0] for r in results] == [0, 0], results[0][2] + results[1][2]
    a, b = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    for rule in rules:
        for name, tensor in a[rule].items():
            # the same sums, split over two processes: equal up to float32 rounding of the order
            torch.testing.assert_close(b[rule][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{rule} {name}")


# 60 steps an epoch of 4 images per rank: room for a Ctrl-C to land mid-epoch
DDP = [*DIGITS[:5], "--batch-size", "8", "--quiet", "--parallel", "ddp"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """An uninterrupted 3-epoch data-parallel run."""
    out = tmp_path_factory.mktemp("ddp") / "reference"
    results = finish(lls_torchrun(*DDP, "--epochs", "3", "--out", str(out), "--json"))
    assert [r[0] for r in results] == [0, 0], results[0][2]
    return out, results


@pytest.mark.slow  # a 3-epoch two-process run (shared with the next test)
def test_data_parallel_run_directory_is_written_by_rank_0(ddp_reference):
    out, results = ddp_reference
    summary = json.loads(results[0][1].strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.5 and results[1][1] == ""  # learns; rank 1 prints nothing
    config = json.loads((out / "config.json").read_text())
    assert config["parallel"] == "ddp" and config["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow  # two-process runs: 3 epochs uninterrupted, 2 interrupted, 1 resumed
def test_data_parallel_ctrl_c_mid_epoch_then_more_epochs_gives_the_same_metrics(ddp_reference, tmp_path):
    reference, _ = ddp_reference
    out = tmp_path / "run"
    ranks = lls_torchrun(*DDP, "--epochs", "2", "--out", str(out))
    wait_for(out / "curves.png", ranks)  # written last after epoch 1
    for rank in ranks:
        rank.signal(SIGINT)
    results = finish(ranks)
    if [r[0] for r in results] == [0, 0]:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert [r[0] for r in results] == [130, 130], results[0][2] + results[1][2]
    assert load_checkpoint_file(out / "checkpoint.pt")["progress"]["step"] > 0
    resumed = finish(
        lls_torchrun("train", "--resume", str(out), "--epochs", "3", "--quiet", "--parallel", "ddp")
    )
    assert [r[0] for r in resumed] == [0, 0], resumed[0][2] + resumed[1][2]
    # exact: every rank resumes its own share of the epoch's sums, and every rank holds rank 0's
    # weights after each evaluation, so the arithmetic is the uninterrupted run's, step for step
    assert metrics(out) == metrics(reference)


@pytest.mark.slow  # two real processes, one killed
def test_a_killed_rank_makes_the_others_stop_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "200", "--batch-size", "16", "--quiet"]
    ranks = lls_torchrun(*argv, "--out", str(out), "--parallel", "pipeline")
    wait_for(out / "checkpoint.pt", ranks)
    ranks[1].signal(9)
    code, _, err = ranks[0].finish(timeout=60)
    assert code == 2
    assert "lost contact with the other ranks" in err and "Traceback" not in err


@pytest.mark.parametrize("rule", ["bp", pytest.param("dfa", marks=pytest.mark.slow)])
def test_pipeline_refuses_rules_that_send_messages_backwards(rule, tmp_path):
    ranks = lls_torchrun(*DIGITS, "--rule", rule, "--out", str(tmp_path / "r"), "--parallel", "pipeline")
    results = finish(ranks)
    assert all(code == 2 for code, _, _ in results)
    assert "needs messages travelling backwards" in results[0][2]
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def test_parallel_without_torchrun_says_how_to_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*DIGITS, "--out", str(tmp_path / "r"), "--parallel", "ddp"]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


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

"""A resumed schedule is the schedule: every named lr schedule (and the API's own factories) resumes
to the last digit, once or twice, and a run given more epochs follows the longer run's schedule.

Every expectation compares two runs made here the same way: one uninterrupted, one stopped and
resumed from its state (the trainer's state_dict, or a run directory's checkpoint)."""

import contextlib
import math

import pytest
import torch

import lls
from lls.cli import main
from lls.step.schedules import SCHEDULES

from .conftest import NUM_CLASSES, TINY_INPUT, TINY_SPECS, tiny_batch
from .test_runs import DIGITS_RUN, final_weights, metrics

LR = 0.05
BATCHES = [tiny_batch(8, seed) for seed in range(3)]  # a fixed order: no loader state to resume
TEST = [tiny_batch(16, 99)]


def trainer(schedule, total: int) -> lls.Trainer:
    """A fresh trainer whose schedule spans ``total`` epochs (a name, or a factory maker)."""
    made = schedule(total) if callable(schedule) else schedule
    return lls.build_trainer(
        TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES, optimizer="sgd", lr=LR, lr_schedule=made, epochs=total
    )


def train(schedule, legs: list[tuple[int, int]]) -> tuple[lls.Trainer, list[float]]:
    """Train in legs ``(until epoch, total epochs)``, each leg a new trainer built for its total and
    loaded with the previous leg's state; returns the last trainer and every epoch's lr."""
    state, lrs, done, current = None, [], 0, None
    for until, total in legs:
        current = trainer(schedule, total)
        if state is not None:
            current.load_state_dict(state)
        history = lls.fit(current, BATCHES, until, start_epoch=done, test=TEST, progress=False)
        lrs += [r.lr for r in history.records]
        state, done = current.state_dict(), until
    return current, lrs


def same_state(a: lls.Trainer, b: lls.Trainer) -> bool:
    left, right = a.state_dict()["net"], b.state_dict()["net"]
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def halving(total: int):  # the API's own factory: torch's scheduler, its state its own
    return lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


SCHEDULE_CASES = [*SCHEDULES.names(), halving, lambda total: lls.lr_schedule("cosine", total)]


@pytest.mark.parametrize("schedule", SCHEDULE_CASES)
def test_one_and_two_resumes_equal_the_uninterrupted_run(schedule):
    whole, whole_lrs = train(schedule, [(4, 4)])
    once, once_lrs = train(schedule, [(2, 4), (4, 4)])
    twice, twice_lrs = train(schedule, [(1, 4), (3, 4), (4, 4)])
    assert once_lrs == twice_lrs == whole_lrs
    assert same_state(once, whole) and same_state(twice, whole)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_a_run_extended_from_its_first_epoch_equals_the_longer_run(name):
    """Every named schedule starts at the full lr, whatever the total: a 1-epoch run given more
    epochs, once or twice, is the uninterrupted longer run to the last digit."""
    whole, whole_lrs = train(name, [(4, 4)])
    once, once_lrs = train(name, [(1, 1), (4, 4)])
    twice, twice_lrs = train(name, [(1, 1), (2, 4), (4, 4)])
    assert once_lrs == twice_lrs == whole_lrs
    assert same_state(once, whole) and same_state(twice, whole)


def test_an_extended_run_continues_on_the_longer_runs_schedule():
    """Extended after epoch 2 of 2, the run trains epochs 3-4 at the 4-epoch run's lrs (the cosine
    formula at 4 epochs), not at the 2-epoch run's end (0) nor from a stale total."""
    _, lrs = train("cosine", [(2, 2), (4, 4)])
    expected = [LR * (1 + math.cos(math.pi * e / total)) / 2 for e, total in ((0, 2), (1, 2), (2, 4), (3, 4))]
    assert lrs == pytest.approx(expected, abs=1e-15)
    assert lrs[2] > 0


@contextlib.contextmanager
def stop_after(polls: int):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > polls

    yield should_stop


STEPS = 192 // 32  # digits, --limit 192, batch 32: the polls of an epoch (its steps and its end)


@pytest.mark.usefixtures("digits")
@pytest.mark.slow  # five digits runs
@pytest.mark.parametrize("name", ["cosine", "step"])
def test_the_command_line_extends_and_resumes_a_scheduled_run_exactly(name, tmp_path, monkeypatch):
    """The issue's run: `--epochs 1`, then `--resume --epochs 3` stopped after epoch 2 and resumed:
    the same metrics and weights as the uninterrupted 3-epoch run, and config.json's epochs 3."""
    common = [*DIGITS_RUN, "--optimizer", "sgd", "--lr-schedule", name, "--limit", "192"]
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "cut")]) == 0
    monkeypatch.setattr("lls.training.run.graceful_interrupt", lambda: stop_after(STEPS + 1))
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "3", "--quiet"]) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "whole")
    whole, cut = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    record = lls.training.rundir.RunDir.open(tmp_path / "cut").read_record()
    assert record["config"]["epochs"] == 3 and record["resumed"][0]["epochs"] == [1, 3]

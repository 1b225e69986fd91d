"""The training loop: what an epoch sums and records, how it resumes and stops, and what the
evaluation after each epoch is handed (the paper's procedure, METHOD.md section 6).

A scripted trainer and loader stand in for the real ones, so every expected number is worked out
by hand from the script."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lls
from lls.training import fit as fit_module
from lls.training.fit import (
    EpochProgress,
    Interrupted,
    LossWatch,
    TrainingDiverged,
    loss_names,
)

# Three batches of 3, 3 and 2 images (the last one partial). Each batch: the head's loss, its two
# blocks' losses, and how many of its images the logits get right.
SCRIPT = [
    {"loss": 1.0, "blocks": (0.5, 2.0), "right": 3},
    {"loss": 2.0, "blocks": (1.5, 1.0), "right": 1},
    {"loss": 4.0, "blocks": (3.0, 0.0), "right": 0},
]
SIZES = (3, 3, 2)
CLASSES = 4


class ScriptedLoader:
    """A loader whose batch ``s`` has SIZES[s] images, labels all 0, and ``x`` filled with ``s``."""

    device = torch.device("cpu")

    def __init__(self, sizes=SIZES):
        self.sizes = sizes
        self.calls = []

    def __len__(self):
        return len(self.sizes)

    def epoch(self, epoch=0, stream="train", start=0):
        self.calls.append((epoch, stream, start))
        for s in range(start, len(self.sizes)):
            n = self.sizes[s]
            yield torch.full((n, 1), float(s)), torch.zeros(n, dtype=torch.long)


class ScriptedTrainer:
    """Returns SCRIPT's losses for the batch it is given; remembers the batches it trained on."""

    lr = 0.125
    input_shape, num_classes = (1,), CLASSES  # what the scripted batches are checked against

    def __init__(self, timing="block", script=SCRIPT, evaluations=None):
        self.net = SimpleNamespace(blocks=[None, None], parameters=lambda: iter([torch.zeros(1)]))
        self.optimizers = [SimpleNamespace(param_groups=[{"lr": self.lr}])]
        self.rule = SimpleNamespace(timing=timing, name="scripted")
        self.script = script
        self.trained = []
        self.evaluations = list(evaluations or [])
        self.evaluated = []

    def train_step(self, x, y):
        s = int(x[0, 0])
        self.trained.append(s)
        entry = self.script[s]
        logits = torch.zeros(len(y), CLASSES)
        logits[: entry["right"], 0] = 1.0  # the first `right` images predicted as class 0 (their label)
        logits[entry["right"] :, 1] = 1.0
        blocks = torch.tensor(entry["blocks"]) if self.rule.timing != "end-to-end" else torch.zeros(0)
        return lls.StepResult(logits, torch.tensor(entry["loss"]), blocks)

    def end_epoch(self):
        pass

    def evaluate(self, batches, refresh=(), *, blocks=False, probe_batches=()):
        self.evaluated.append(
            {"test": list(batches), "refresh": list(refresh), "blocks": blocks, "probes": list(probe_batches)}
        )
        return (
            self.evaluations.pop(0) if self.evaluations else lls.Evaluation(0.5, 0.75, [0.25, 0.5], "basis")
        )


def loaders(sizes=SIZES):
    return lls.Loaders(train=ScriptedLoader(sizes), test=ScriptedLoader((5,)), probe=ScriptedLoader((2,)))


def test_an_epoch_sums_losses_and_counts_weighted_by_batch_size():
    trainer = ScriptedTrainer()
    done = lls.train_epoch(trainer, ScriptedLoader(), epoch=4, progress=False)
    assert trainer.trained == [0, 1, 2]  # every batch, the partial last one too
    assert (done.epoch, done.step, done.seen) == (4, 3, 8)
    assert done.loss_sum == pytest.approx(3 * 1.0 + 3 * 2.0 + 2 * 4.0)
    assert done.correct == 3 + 1 + 0
    assert done.block_sums == pytest.approx([3 * 0.5 + 3 * 1.5 + 2 * 3.0, 3 * 2.0 + 3 * 1.0 + 2 * 0.0])
    assert done.seconds >= 0


def test_an_epoch_resumes_from_its_progress():
    trainer = ScriptedTrainer()
    loader = ScriptedLoader()
    resume = EpochProgress(
        epoch=2, step=1, loss_sum=10.0, correct=5, seen=7, block_sums=[1.0, 2.0], seconds=3.0
    )
    done = lls.train_epoch(trainer, loader, epoch=2, progress=False, resume=resume)
    assert loader.calls == [(2, "train", 1)]  # the loader skips the batch already trained
    assert trainer.trained == [1, 2]
    assert (done.step, done.seen, done.correct) == (3, 7 + 5, 5 + 1)
    assert done.loss_sum == pytest.approx(10.0 + 3 * 2.0 + 2 * 4.0)
    assert done.block_sums == pytest.approx([1.0 + 3 * 1.5 + 2 * 3.0, 2.0 + 3 * 1.0])
    assert done.seconds >= 3.0  # the time already spent is kept


def test_a_stop_request_interrupts_at_a_step_boundary_with_the_sums_so_far():
    trainer = ScriptedTrainer()
    asked = []

    def should_stop():
        asked.append(len(trainer.trained))
        return len(trainer.trained) == 2

    with pytest.raises(Interrupted, match="interrupted at epoch 1, step 2") as caught:
        lls.train_epoch(trainer, ScriptedLoader(), epoch=0, progress=False, should_stop=should_stop)
    progress = caught.value.progress
    assert (progress.epoch, progress.step, progress.seen, progress.correct) == (0, 2, 6, 4)
    assert progress.loss_sum == pytest.approx(9.0)
    assert asked == [1, 2]
    # a stop asked at the very last step is no interruption: the epoch is complete
    trainer = ScriptedTrainer()
    last = lambda: len(trainer.trained) == 3  # noqa: E731
    done = lls.train_epoch(trainer, ScriptedLoader(), epoch=0, progress=False, should_stop=last)
    assert done.step == 3 and done.seen == 8


def test_an_empty_training_set_is_named():
    with pytest.raises(lls.LLSError, match=r"^the training set is empty$"):
        lls.train_epoch(ScriptedTrainer(), ScriptedLoader(sizes=()), epoch=0, progress=False)


def test_bp_epochs_have_no_block_losses():
    trainer = ScriptedTrainer(timing="end-to-end")
    done = lls.train_epoch(trainer, ScriptedLoader(), epoch=0, progress=False)
    assert done.block_sums == [] and done.loss_sum == pytest.approx(17.0)
    assert loss_names(trainer, range(2)) == ["the head's loss"]
    assert loss_names(ScriptedTrainer(), range(2)) == [
        "block 0's local loss",
        "block 1's local loss",
        "the head's loss",
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_the_epoch_naming_the_step_and_the_loss(bad):
    script = [dict(SCRIPT[0]), dict(SCRIPT[1]), dict(SCRIPT[2])]
    script[1]["blocks"] = (0.5, bad)
    with pytest.raises(TrainingDiverged, match=f"epoch 3, step 2: block 1's local loss is {bad}; lower --lr"):
        lls.train_epoch(ScriptedTrainer(script=script), ScriptedLoader(), epoch=2, progress=False)


def test_the_divergence_check_counts_steps_across_windows():
    watch = LossWatch(["a", "b"], epoch=0, first_step=5)
    watch.add(torch.tensor([1.0, 2.0]))
    watch.check()  # step 5 is fine
    watch.add(torch.tensor([1.0, 2.0]))
    watch.add(torch.tensor([1.0, math.nan]))
    with pytest.raises(TrainingDiverged, match="epoch 1, step 7: b is nan"):
        watch.check()


def test_the_progress_bar_shows_the_running_means():
    trainer = ScriptedTrainer()
    shown = []
    original = fit_module._postfix
    fit_module._postfix = lambda *a: shown.append(a) or original(*a)
    try:
        lls.train_epoch(trainer, ScriptedLoader(), epoch=0, progress=True)
    finally:
        fit_module._postfix = original
    assert len(shown) == 1  # checked once, at the last step (fewer steps than CHECK_EVERY)
    loss, accuracy, blocks = shown[0]
    assert loss == pytest.approx(17 / 8) and accuracy == pytest.approx(4 / 8)
    assert blocks == pytest.approx([12 / 8, 9 / 8])
    assert original(17 / 8, 0.5, [1.5, 1.125]) == "loss 2.125 acc 50.0% | blocks 1.500 1.125"
    assert original(2.0, 0.25, []) == "loss 2.000 acc 25.0%"


def test_evaluation_is_handed_50_refresh_batches_of_this_epoch_the_test_set_and_the_probes():
    trainer = ScriptedTrainer()
    data = loaders(sizes=(3,) * 60)
    result, seconds = lls.evaluate(trainer, data, epoch=6, blocks=True)
    assert result.accuracy == 0.75 and seconds >= 0
    (seen,) = trainer.evaluated
    assert len(seen["refresh"]) == 50  # METHOD.md section 6: 50 training batches
    assert data.train.calls == [(6, "refresh", 0)]  # its own stream: the epoch's batches are not consumed
    assert [len(y) for _, y in seen["test"]] == [5] and [len(y) for _, y in seen["probes"]] == [2]
    assert seen["blocks"] is True
    lls.evaluate(trainer, data, epoch=6, blocks=False)
    assert trainer.evaluated[-1]["probes"] == [] and trainer.evaluated[-1]["blocks"] is False


def test_fit_records_each_epoch_from_its_sums():
    trainer = ScriptedTrainer(
        evaluations=[lls.Evaluation(0.9, 0.5, [0.1, 0.2], "basis"), lls.Evaluation(0.7, 0.8, [], None)]
    )
    records = []
    history = lls.fit(trainer, loaders(), 2, progress=False, on_epoch=records.append)
    assert history.records == records and [r.epoch for r in records] == [1, 2]
    first = records[0]
    assert first.train_loss == pytest.approx(17 / 8) and first.train_accuracy == pytest.approx(4 / 8)
    assert first.block_losses == pytest.approx([12 / 8, 9 / 8])
    assert (first.test_loss, first.test_accuracy, first.block_accuracy, first.readout) == (
        0.9,
        0.5,
        [0.1, 0.2],
        "basis",
    )
    assert first.lr == 0.125 and first.eval_seconds >= 0 and first.train_seconds >= 0
    assert trainer.evaluated[0]["blocks"] is True  # block accuracy by default
    assert history.best_test_accuracy == 0.8 and history.final_test_accuracy == 0.8
    assert history.train_seconds == pytest.approx(records[0].train_seconds + records[1].train_seconds)
    assert set(records[0].as_dict()) >= {"epoch", "train_loss", "test_accuracy", "block_accuracy"}


def test_fit_resumes_mid_epoch_and_continues_a_history():
    trainer = ScriptedTrainer()
    data = loaders()
    earlier = lls.History([lls.EpochRecord(1, 0, 0, [], 0, 0.9, 0, 0, 0.1)])
    resume = EpochProgress(epoch=1, step=2, loss_sum=6.0, correct=2, seen=6, block_sums=[0.0, 0.0])
    history = lls.fit(trainer, data, 3, progress=False, history=earlier, resume=resume, start_epoch=0)
    assert history is earlier and [r.epoch for r in history.records] == [1, 2, 3]
    assert [c[2] for c in data.train.calls if c[1] == "train"] == [2, 0]  # epoch 2 from step 2, epoch 3 whole
    assert history.records[1].train_loss == pytest.approx((6.0 + 2 * 4.0) / 8)
    assert history.best_test_accuracy == 0.9 and history.final_test_accuracy == 0.75
    trainer = ScriptedTrainer()
    data = loaders()
    assert [r.epoch for r in lls.fit(trainer, data, 3, progress=False, start_epoch=2).records] == [3]


def test_fit_stops_between_epochs_but_not_after_the_last():
    trainer = ScriptedTrainer()
    with pytest.raises(Interrupted, match=r"^interrupted at an epoch boundary$") as caught:
        lls.fit(trainer, loaders(), 3, progress=False, should_stop=lambda: len(trainer.trained) >= 3)
    assert caught.value.progress is None and len(trainer.evaluated) == 1  # epoch 1 recorded, then stopped
    history = lls.fit(ScriptedTrainer(), loaders(), 1, progress=False, should_stop=lambda: False)
    assert len(history.records) == 1


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_fit_refuses_a_non_finite_test_loss(loss):
    trainer = ScriptedTrainer(evaluations=[lls.Evaluation(loss, 0.1, [])])
    with pytest.raises(
        TrainingDiverged, match=f"evaluation after epoch 1 gave a test loss of {loss}; lower --lr"
    ):
        lls.fit(trainer, loaders(), 2, progress=False)


def test_empty_history_has_no_accuracy():
    history = lls.History()
    assert math.isnan(history.best_test_accuracy) and math.isnan(history.final_test_accuracy)
    assert history.train_seconds == 0


def test_epoch_progress_round_trips_and_rejects_what_is_not_a_count():
    progress = EpochProgress(epoch=1, step=4, loss_sum=2.5, correct=3, seen=8, block_sums=[1.0], seconds=0.5)
    assert EpochProgress.from_dict({**progress.as_dict(), "unknown": 1}) == progress
    assert EpochProgress.from_dict({"epoch": 0}) == EpochProgress(0)  # zero counts are counts
    for field, value in (("epoch", -1), ("step", 1.5), ("correct", "3"), ("seen", -2)):
        with pytest.raises(ValueError, match=r"^epoch, step, correct and seen must be counts, got \("):
            EpochProgress.from_dict({**progress.as_dict(), field: value})
    for field in ("loss_sum", "seconds"):
        with pytest.raises(ValueError, match=r"^loss_sum and seconds must be numbers$"):
            EpochProgress.from_dict({**progress.as_dict(), field: "1"})
    with pytest.raises(ValueError, match=r"^block_sums must be a list$"):
        EpochProgress.from_dict({**progress.as_dict(), "block_sums": 1.0})


def test_loaders_for_a_dataset(digits):
    """Training batches shuffled and augmented with the run's seed, merged so that BatchNorm gets at
    least 2 images; the test set in fixed order at the evaluation batch size; the ridge probes on
    the first training images, never randomly cropped."""
    data = lls.Loaders.for_dataset(digits, batch_size=16, seed=3, limit=100, channels_last=True)
    assert (data.train.batch_size, data.train.seed, data.train.shuffle, data.train.min_batch) == (
        16,
        3,
        True,
        2,
    )
    assert data.test.batch_size == fit_module.EVAL_BATCH_SIZE and not data.test.shuffle
    assert len(data.train.labels) == 100 and len(data.test.labels) == min(100, len(digits.test.labels))
    assert len(data.probe.labels) == min(fit_module.PROBE_IMAGES, 100)
    assert torch.equal(data.probe.labels, digits.train.labels[: len(data.probe.labels)])
    x, _ = next(data.test.epoch())
    assert x.is_contiguous(memory_format=torch.channels_last)
    raw = digits.test.images[: len(x)].float() / 255
    mean, std = torch.tensor(digits.mean).view(1, -1, 1, 1), torch.tensor(digits.std).view(1, -1, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)  # normalised with the dataset's statistics
    plain = lls.Loaders.for_dataset(digits, batch_size=16)
    assert next(plain.train.epoch())[0].is_contiguous() and plain.train.seed == 0  # the defaults


def test_an_epoch_sees_every_training_image_once_the_partial_last_batch_included(digits):
    """100 images in batches of 16: six full batches and one of 4, each image exactly once."""
    data = lls.Loaders.for_dataset(digits, batch_size=16, seed=1, limit=100)
    seen = []

    class Recorder(ScriptedTrainer):
        def train_step(self, x, y):
            seen.append(x.flatten(1).clone())
            return lls.StepResult(torch.zeros(len(y), CLASSES), torch.tensor(1.0), torch.zeros(2))

    done = lls.train_epoch(Recorder(), data.train, epoch=0, progress=False)
    assert [len(x) for x in seen] == [16] * 6 + [4] and done.seen == 100
    # every image once: the batches are a permutation of the first 100 training images (flips and
    # crops aside: digits has no augmentation)
    images = torch.cat(seen)
    expected = next(
        data.test.__class__(digits.train.head(100), 100, mean=digits.mean, std=digits.std).epoch()
    )[0]
    assert sorted(map(tuple, images.tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))


def test_progress_is_shown_by_default_on_stderr(capsys):
    lls.train_epoch(ScriptedTrainer(), ScriptedLoader(), epoch=0, desc="epoch 1/1")
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss 2.125 acc 50.0% | blocks 1.500 1.125" in err
    lls.fit(ScriptedTrainer(), loaders(), 2)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    lls.fit(ScriptedTrainer(), loaders(), 1, progress=False)
    assert capsys.readouterr().err == ""


def test_evaluation_reports_the_seconds_it_took(monkeypatch):
    clock = iter([100.0, 102.5])
    monkeypatch.setattr(fit_module.time, "perf_counter", lambda: next(clock))
    trainer = ScriptedTrainer()
    _, seconds = lls.evaluate(trainer, loaders(), epoch=0)
    assert seconds == 2.5
    assert trainer.evaluated[0]["blocks"] is True  # each block's accuracy unless asked not to


def test_each_epoch_trains_and_refreshes_from_that_epochs_batches():
    data = loaders()
    lls.fit(ScriptedTrainer(), data, 2, progress=False)
    assert [c for c in data.train.calls if c[1] == "refresh"] == [(0, "refresh", 0), (1, "refresh", 0)]
    assert [c for c in data.train.calls if c[1] == "train"] == [(0, "train", 0), (1, "train", 0)]


def test_the_training_loader_augments_as_the_dataset_says(digits):
    import dataclasses

    from lls.data.base import Augment

    flipped = dataclasses.replace(digits, augment=Augment(hflip=True))
    data = lls.Loaders.for_dataset(flipped, batch_size=16)
    assert data.train.augment == Augment(hflip=True)
    assert data.test.augment != Augment(hflip=True) and data.probe.augment != Augment(hflip=True)


def test_epoch_sums_are_kept_in_double_precision():
    """A float32 sum stops counting a loss of 1 at 2**24: the epoch's sums, fresh or resumed, are float64."""
    big = float(2**24)
    script = [
        {"loss": big, "blocks": (big, 0.0), "right": 1},
        {"loss": 1.0, "blocks": (1.0, 0.0), "right": 0},
    ]
    done = lls.train_epoch(ScriptedTrainer(script=script), ScriptedLoader((1, 1)), epoch=0, progress=False)
    assert done.loss_sum == big + 1 and done.block_sums == [big + 1, 0.0]
    resume = EpochProgress(epoch=0, step=1, loss_sum=big, correct=1, seen=1, block_sums=[big, 0.0])
    trainer = ScriptedTrainer(script=script)
    done = lls.train_epoch(trainer, ScriptedLoader((1, 1)), epoch=0, progress=False, resume=resume)
    assert trainer.trained == [1] and done.loss_sum == big + 1 and done.block_sums == [big + 1, 0.0]


def test_an_epoch_counts_its_seconds_on_from_the_resumed_ones(monkeypatch):
    clock = iter([100.0, 102.5])  # the epoch's start, its end
    monkeypatch.setattr(fit_module.time, "perf_counter", lambda: next(clock))
    resume = EpochProgress(
        epoch=0, step=1, loss_sum=3.0, correct=3, seen=3, block_sums=[1.5, 6.0], seconds=3.0
    )
    done = lls.train_epoch(ScriptedTrainer(), ScriptedLoader(), epoch=0, progress=False, resume=resume)
    assert done.seconds == 3.0 + 2.5


def test_a_progress_with_every_step_done_is_returned_as_it_is():
    """A checkpoint taken after an epoch's last step resumes into nothing left to train."""
    resume = EpochProgress(epoch=0, step=3, loss_sum=17.0, correct=4, seen=8, block_sums=[12.0, 9.0])
    trainer = ScriptedTrainer()
    done = lls.train_epoch(trainer, ScriptedLoader(), epoch=0, progress=False, resume=resume)
    assert trainer.trained == [] and (done.step, done.seen, done.loss_sum, done.block_sums) == (
        3,
        8,
        17.0,
        [12, 9],
    )


def stage_step(losses, head_loss=None):
    """A pipeline stage's step: its blocks' losses, with the head's loss only if it ends with the head."""

    def step(x, y):
        logits = None if head_loss is None else torch.zeros(len(y), CLASSES)
        loss = None if head_loss is None else torch.tensor(head_loss)
        return lls.StepResult(logits, loss, torch.tensor(losses))

    return step


def test_a_pipeline_stage_trains_the_batches_it_is_handed_with_its_own_step():
    trainer = ScriptedTrainer()
    trainer.net.blocks = [None, None, None]
    handed = [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))] * 2  # what the stage before sent
    done = lls.train_epoch(
        trainer,
        ScriptedLoader((5, 5)),  # the stage's share of the epoch: it reads what it is handed instead
        epoch=0,
        progress=False,
        batches=handed,
        step_fn=stage_step([0.5, 0.25]),
        blocks=range(0, 2),
    )
    assert trainer.trained == [] and (done.step, done.seen) == (2, 4)
    assert done.block_sums == [2 * 0.5 * 2, 2 * 0.25 * 2] and done.loss_sum == 0 and done.correct == 0


@pytest.mark.parametrize(
    "blocks, losses, head_loss, named",
    [
        (range(0, 2), [0.5, math.nan], None, "block 1's local loss"),  # the first of three stages' 2nd block
        (range(1, 2), [math.nan], None, "block 1's local loss"),  # a middle stage's only block
        (range(2, 3), [0.5], math.nan, "the head's loss"),  # the last stage ends with the head
    ],
)
def test_a_pipeline_stage_names_its_own_diverged_loss(blocks, losses, head_loss, named):
    trainer = ScriptedTrainer()
    trainer.net.blocks = [None, None, None]
    handed = [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(
        TrainingDiverged, match=rf"^training diverged at epoch 2, step 1: {named} is nan; lower --lr$"
    ):
        lls.train_epoch(
            trainer,
            ScriptedLoader((2,)),
            epoch=1,
            progress=False,
            batches=handed,
            step_fn=stage_step(losses, head_loss),
            blocks=blocks,
        )


def frames(err: str) -> list[str]:
    """The progress bar's successive renderings in what it wrote to stderr."""
    return [f.strip() for f in err.replace("\n", "\r").split("\r") if f.strip()]


def test_the_progress_bar_counts_steps_and_shows_the_means_checked_every_10_steps(capsys):
    trainer = ScriptedTrainer(script=[SCRIPT[0]] * 12)  # every batch: loss 1, blocks 0.5 and 2, all right
    shown = []
    original = fit_module._postfix
    fit_module._postfix = lambda *a: shown.append(a) or original(*a)
    try:
        lls.train_epoch(trainer, ScriptedLoader((3,) * 12), epoch=0, progress=True)
    finally:
        fit_module._postfix = original
    assert shown == [(1.0, 1.0, [0.5, 2.0])] * 2  # at step 10 and at the last step, 12
    bar = frames(capsys.readouterr().err)
    assert bar[0].startswith("0%|") and bar[-1].startswith("100%|")  # no label when none is given
    assert "| 12/12 [" in bar[-1] and bar[-1].endswith("loss 1.000 acc 100.0% | blocks 0.500 2.000]")
    # the means are shown with the count they are the means of, never with an older one
    assert not [f for f in bar if "loss" in f and "| 0/12 [" in f]


def test_a_resumed_epochs_progress_bar_starts_at_its_step(capsys):
    resume = EpochProgress(epoch=0, step=1, loss_sum=3.0, correct=3, seen=3, block_sums=[1.5, 6.0])
    lls.train_epoch(ScriptedTrainer(), ScriptedLoader(), epoch=0, resume=resume)
    bar = frames(capsys.readouterr().err)
    assert "| 1/3 [" in bar[0] and "| 3/3 [" in bar[-1]


def test_the_single_process_strategy():
    strategy = fit_module.Strategy()
    assert strategy.describe() == "" and strategy.record() == {} and strategy.main
    progress = EpochProgress(epoch=1, step=4, loss_sum=2.5, correct=3, seen=8, block_sums=[1.0], seconds=0.5)
    assert strategy.resume_progress(strategy.progress_record(progress)) == progress


def test_fit_without_block_accuracy_evaluates_the_head_only():
    trainer = ScriptedTrainer()
    lls.fit(trainer, loaders(), 1, progress=False, block_accuracy=False)
    assert trainer.evaluated[0]["blocks"] is False and trainer.evaluated[0]["probes"] == []


def test_fit_passes_a_stop_request_into_the_epoch():
    trainer = ScriptedTrainer()
    with pytest.raises(Interrupted, match=r"^interrupted at epoch 1, step 2$") as caught:
        lls.fit(trainer, loaders(), 2, progress=False, should_stop=lambda: len(trainer.trained) == 2)
    assert caught.value.progress.step == 2 and trainer.evaluated == []


def test_fit_stops_after_the_epoch_in_which_the_stop_was_asked():
    """A stop asked at an epoch's last step ends the run right after that epoch is recorded;
    after the last epoch there is nothing left to stop."""
    trainer = ScriptedTrainer()
    records = []
    with pytest.raises(Interrupted, match=r"^interrupted at an epoch boundary$"):
        stop = lambda: len(trainer.trained) >= 6  # noqa: E731 (the last step of epoch 2)
        lls.fit(trainer, loaders(), 3, progress=False, should_stop=stop, on_epoch=records.append)
    assert [r.epoch for r in records] == [1, 2]
    trainer = ScriptedTrainer()
    stop = lambda: len(trainer.trained) >= 6  # noqa: E731
    assert len(lls.fit(trainer, loaders(), 2, progress=False, should_stop=stop).records) == 2


def test_fit_records_the_strategys_stage_busy_fractions():
    class Staged(fit_module.Strategy):
        def train_epoch(self, trainer, loaders, epoch, **options):
            done = super().train_epoch(trainer, loaders, epoch, **options)
            done.stage_busy = [0.75, 0.5]
            return done

    history = lls.fit(ScriptedTrainer(), loaders(), 1, strategy=Staged(), progress=False)
    assert history.records[0].stage_busy == [0.75, 0.5]


def test_fit_takes_lists_of_batches_and_refuses_a_batch_too_small_for_batchnorm():
    def batches(sizes):
        return [(torch.full((n, 1), float(s)), torch.zeros(n, dtype=torch.long)) for s, n in enumerate(sizes)]

    history = lls.fit(ScriptedTrainer(), batches(SIZES), 1, test=batches((5,)), progress=False)
    assert history.records[0].train_loss == pytest.approx(17 / 8)
    with pytest.raises(lls.LLSError, match=r"^a training batch of 1 sample\(s\): BatchNorm needs 2; "):
        lls.fit(ScriptedTrainer(), batches((1,)), 1, test=batches((5,)), progress=False)


def test_a_last_batch_of_one_is_merged_into_the_one_before_as_lls_train_does():
    """(3, 3, 1) trains as (3, 4): the scripted batch 1 with the lone image of batch 2 appended."""
    sizes = (3, 3, 1)
    batches = [(torch.full((n, 1), float(s)), torch.zeros(n, dtype=torch.long)) for s, n in enumerate(sizes)]
    trainer = ScriptedTrainer()
    seen = []
    step = trainer.train_step
    trainer.train_step = lambda x, y: seen.append(x[:, 0].tolist()) or step(x, y)
    history = lls.fit(trainer, batches, 1, test=batches[:1], progress=False)
    assert seen == [[0.0] * 3, [1.0, 1.0, 1.0, 2.0]]
    # batch 0's loss 3 times, then batch 1's (the script's, by its first image) 4 times: 7 images
    loss = [SCRIPT[0]["loss"]] * 3 + [SCRIPT[1]["loss"]] * 4
    assert history.records[0].train_loss == pytest.approx(sum(loss) / 7)


def test_the_ridge_probes_get_the_first_2048_training_images_in_the_layout_asked_for():
    """The ridge probes are fitted on the first 2048 training images (readout.PROBE_IMAGES); every loader's
    3-channel batches are channels-last unless asked not to be (one channel cannot tell the two
    layouts apart: their strides are the same)."""
    images = torch.randint(0, 256, (2100, 3, 4, 4), dtype=torch.uint8)
    split = lls.data.Split(images, torch.arange(2100) % 2)
    data = lls.Dataset("tiny", split, split.head(10), 2, (0.5,) * 3, (0.25,) * 3)
    default = lls.Loaders.for_dataset(data, batch_size=8)
    assert len(default.probe.labels) == 2048 and len(default.train.labels) == 2100
    for loader in (default.train, default.test, default.probe):
        assert next(loader.epoch())[0].is_contiguous(memory_format=torch.channels_last)
    plain = lls.Loaders.for_dataset(data, batch_size=8, channels_last=False)
    for loader in (plain.train, plain.test, plain.probe):
        x = next(loader.epoch())[0]
        assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    from lls.data import drawn_on

    assert drawn_on(default.train) == "host"
    assert drawn_on(lls.Loaders.for_dataset(data, batch_size=8, draws="device").train) == "device:cpu"


def test_the_ridge_probes_of_a_streamed_set_are_centre_crops(tmp_path):
    """Streamed training images are randomly cropped; the probes' are not (they are unaugmented)."""
    from PIL import Image

    from lls.data.base import FileSplit

    noise = torch.Generator().manual_seed(0)
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=noise)
        Image.fromarray(pixels.numpy()).save(files[-1])
    labels = torch.tensor([0, 1, 0, 1])
    train, centred = FileSplit(files, labels, 8, random_crop=True), FileSplit(files, labels, 8)
    data = lls.Dataset("files", train, centred, 2, (0.0,) * 3, (1.0,) * 3)
    made = lls.Loaders.for_dataset(data, batch_size=4)
    (probe,), (test,) = list(made.probe.epoch()), list(made.test.epoch())
    assert torch.equal(probe[0], test[0]) and torch.equal(probe[1], labels)
    cropped = next(made.train.epoch(stream="refresh"))[0]  # the training stream's crops do differ
    assert not torch.equal(cropped.sort(0).values, test[0].sort(0).values)

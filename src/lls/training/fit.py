"""The training loop around a :class:`~lls.step.trainer.Trainer`: epochs, evaluation, progress, records.

:func:`fit` runs epochs through a :class:`Strategy`. The base strategy trains in this process;
data parallelism and the layer pipeline (``distributed.py``, ``pipeline.py``) are strategies that
change how an epoch is trained and evaluated across processes, and nothing else: the epoch records,
the divergence check and the stop requests are the same for all of them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import torch
from tqdm import tqdm

from ..checks import check_fields, checked
from ..data import BatchLoader, Dataset, FileSplit, make_loader
from ..data.batches import IterableBatches, checked_loaders
from ..errors import LLSError
from ..method.readout import PROBE_IMAGES, RIDGE_PROBE, readout_kind
from ..step.step import StepResult
from ..step.trainer import Evaluation, Trainer
from .config import DEFAULTS

REFRESH_BATCHES = 50  # BatchNorm refresh before each evaluation (the paper's procedure)
EVAL_BATCH_SIZE = 250  # results do not depend on it in eval mode; larger is slower on CPU
BATCHNORM_MIN_BATCH = 2  # images per process a training batch needs for BatchNorm's batch statistics
CHECK_EVERY = 10  # steps between finiteness checks and progress updates (each syncs with the device)


class TrainingDiverged(LLSError):
    """A loss became NaN or infinite."""


class Interrupted(Exception):  # a control-flow signal, not an error
    """Training stopped on request: mid-epoch at a step boundary (``progress`` says where) or,
    with ``progress`` None, right after an epoch was recorded."""

    def __init__(self, progress: EpochProgress | None) -> None:
        where = f"epoch {progress.epoch + 1}, step {progress.step}" if progress else "an epoch boundary"
        super().__init__(f"interrupted at {where}")
        self.progress = progress


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    block_losses: list[float]  # mean local loss of each block (empty for bp)
    test_loss: float
    test_accuracy: float
    train_seconds: float
    eval_seconds: float
    lr: float
    block_accuracy: list[float] = field(default_factory=list)  # each block's own test accuracy
    readout: str | None = None  # how blocks are read out: "basis", "learned classifier", "ridge probe"
    stage_busy: list[float] = field(default_factory=list)  # pipeline: each stage's busy fraction

    def __post_init__(self) -> None:
        check_fields(self)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochProgress:
    """Running sums of an epoch in progress; what a mid-epoch checkpoint stores to resume exactly."""

    epoch: int  # 0-based
    step: int = 0  # completed steps
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    block_sums: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stage_busy: list[float] = field(default_factory=list)  # pipeline: each stage's busy fraction

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochProgress:
        known = {f.name for f in dataclasses.fields(cls)}
        progress = cls(**{k: v for k, v in values.items() if k in known})
        counts = (progress.epoch, progress.step, progress.correct, progress.seen)
        if not all(isinstance(v, int) and v >= 0 for v in counts):
            raise ValueError(f"epoch, step, correct and seen must be counts, got {counts}")
        if not all(isinstance(v, (int, float)) for v in (progress.loss_sum, progress.seconds)):
            raise ValueError("loss_sum and seconds must be numbers")
        if not isinstance(progress.block_sums, list):
            raise ValueError("block_sums must be a list")
        return progress


@dataclass
class History:
    records: list[EpochRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def best_test_accuracy(self) -> float:
        return max((r.test_accuracy for r in self.records), default=float("nan"))

    @property
    def final_test_accuracy(self) -> float:
        return self.records[-1].test_accuracy if self.records else float("nan")

    @property
    def train_seconds(self) -> float:
        return sum(r.train_seconds for r in self.records)


@dataclass
class Loaders:
    """lls' own loaders, or any re-iterable of ``(x, y)`` batches (a DataLoader): see ``data/batches.py``."""

    train: BatchLoader | Iterable
    test: BatchLoader | Iterable
    probe: BatchLoader | Iterable | None = None  # unaugmented training images for the ridge probes

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    @checked
    def for_dataset(
        cls,
        data: Dataset,
        batch_size: int = DEFAULTS.batch_size,
        *,
        seed: int = DEFAULTS.seed,
        device: torch.device | str = "cpu",
        limit: int | None = DEFAULTS.limit,
        channels_last: bool = DEFAULTS.channels_last,
        draws: str = "host",
    ) -> Loaders:
        """The loaders ``lls train`` makes (its defaults); ``draws``: where the training loader
        shuffles and augments (``make_loader``)."""
        layout = torch.channels_last if channels_last else torch.contiguous_format
        common = {"mean": data.mean, "std": data.std, "device": device, "memory_format": layout}
        train = data.train.head(limit)
        probe = train.head(min(PROBE_IMAGES, len(train)))
        if isinstance(probe, FileSplit):
            probe = dataclasses.replace(probe, random_crop=False)
        train_loader = make_loader(
            train, batch_size, augment=data.augment, shuffle=True, seed=seed, draws=draws, **common
        )
        train_loader.min_batch = BATCHNORM_MIN_BATCH
        return cls(
            train=train_loader,
            test=make_loader(data.test.head(limit), EVAL_BATCH_SIZE, **common),
            probe=make_loader(probe, EVAL_BATCH_SIZE, **common),
        )


class LossWatch:
    """Keeps each step's losses on the device and checks them every CHECK_EVERY steps (a check
    waits for the device), raising :class:`TrainingDiverged` that names the first bad loss."""

    def __init__(self, names: list[str], epoch: int, first_step: int) -> None:
        self.names, self.epoch, self.first = names, epoch, first_step
        self.window: list[torch.Tensor] = []

    def add(self, losses: torch.Tensor) -> None:
        self.window.append(losses.detach().float())

    def check(self) -> None:
        if self.window:
            values = torch.stack(self.window)
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                row = int(bad.any(1).nonzero()[0])
                column = int(bad[row].nonzero()[0])
                raise TrainingDiverged(
                    f"training diverged at epoch {self.epoch + 1}, step {self.first + row}: "
                    f"{self.names[column]} is {values[row, column].item()}; lower --lr"
                )
        self.first += len(self.window)
        self.window = []


def loss_names(trainer: Trainer, blocks: range) -> list[str]:
    """What each column of a step's losses is: the blocks' local losses, then the head's."""
    local = [] if trainer.rule.timing == "end-to-end" else [f"block {i}'s local loss" for i in blocks]
    return [*local, "the head's loss"]


@checked
def train_epoch(
    trainer: Trainer,
    loader: BatchLoader | IterableBatches,
    epoch: int,
    *,
    progress: bool = True,
    desc: str = "",
    resume: EpochProgress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    step_fn: Callable[[torch.Tensor, torch.Tensor], StepResult] | None = None,
    blocks: range | None = None,
) -> EpochProgress:
    """One pass over the training data, from ``resume``'s step if given.

    Checks every few steps that all losses are finite and whether ``should_stop()``; if so it
    raises :class:`Interrupted` with the sums so far, at a step boundary. A pipeline stage passes
    its own ``batches`` (what the stage before sent), ``step_fn`` (its blocks' step: a result
    without logits and head loss unless the stage ends with the head) and its ``blocks``.
    """
    state = resume or EpochProgress(epoch)
    steps, device = len(loader), loader.device
    loss_sum = torch.tensor(state.loss_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(state.correct, device=device, dtype=torch.int64)
    block_sum = torch.tensor(state.block_sums, device=device, dtype=torch.float64)
    blocks = range(len(trainer.net.blocks)) if blocks is None else blocks
    names = loss_names(trainer, blocks)
    if blocks.stop != len(trainer.net.blocks):  # a pipeline stage without the head
        names = names[:-1]
    watch = LossWatch(names, epoch, state.step + 1)
    step_fn = step_fn or trainer.train_step
    batches = loader.epoch(epoch, start=state.step) if batches is None else batches
    bar = tqdm(
        total=steps, initial=state.step, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    start = time.perf_counter() - state.seconds

    def snapshot(step: int) -> EpochProgress:
        sums = (float(loss_sum), int(correct), state.seen, block_sum.tolist())
        return EpochProgress(epoch, step, *sums, time.perf_counter() - start)

    step = state.step
    try:
        for step, (x, y) in enumerate(batches, start=state.step + 1):
            result = step_fn(x, y)
            n = len(y)
            if block_sum.numel() != result.block_losses.numel():
                block_sum = torch.zeros(result.block_losses.numel(), device=device, dtype=torch.float64)
            block_sum += result.block_losses.double() * n
            state.seen += n
            if result.loss is None:  # a pipeline stage before the head
                watch.add(result.block_losses.float())
            else:
                loss_sum += result.loss.double() * n
                correct += (result.logits.argmax(1) == y).sum()
                watch.add(torch.cat([result.block_losses.float(), result.loss.float().view(1)]))
            stop = should_stop()
            if step % CHECK_EVERY == 0 or step == steps or stop:
                watch.check()
                if progress:
                    seen = state.seen
                    text = _postfix(float(loss_sum) / seen, int(correct) / seen, (block_sum / seen).tolist())
                    bar.set_postfix_str(text, refresh=False)
                    bar.update(step - bar.n)
            if stop and step < steps:
                raise Interrupted(snapshot(step))
    finally:
        bar.close()
    if state.seen == 0:
        raise LLSError("the training set is empty")
    return snapshot(step)


def _postfix(loss: float, accuracy: float, blocks: list[float]) -> str:
    text = f"loss {loss:.3f} acc {100 * accuracy:.1f}%"
    if blocks:
        text += " | blocks " + " ".join(f"{b:.3f}" for b in blocks)
    return text


@checked
def evaluate(trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool = True) -> tuple[Evaluation, float]:
    """The paper's evaluation (averaged weights, BN refresh on 50 training batches, test set),
    with each block's own accuracy when ``blocks``; returns it with the seconds it took."""
    start = time.perf_counter()
    refresh = islice(loaders.train.epoch(epoch, stream="refresh"), REFRESH_BATCHES)
    probes = loaders.probe.epoch() if blocks and loaders.probe is not None else ()
    result = trainer.evaluate(loaders.test.epoch(), refresh=refresh, blocks=blocks, probe_batches=probes)
    return result, time.perf_counter() - start


NO_PROBES = (
    "no block accuracy: {rule}'s blocks have no readout of their own and fit got no probe batches "
    "(Loaders(..., probe=unaugmented training batches) fits a ridge probe per block)"
)


def has_block_readout(trainer: Trainer, loaders: Loaders) -> bool:
    """Whether each block's own accuracy can be measured: the rule's blocks have a readout of
    their own, or ``loaders.probe`` gives the batches their ridge probes are fitted on. Says once
    (a warning) when neither."""
    signals = getattr(trainer, "signals", None)  # None: a stand-in trainer that reads out nothing
    if signals is None or loaders.probe is not None or readout_kind(signals) != RIDGE_PROBE:
        return True
    warnings.warn(NO_PROBES.format(rule=trainer.rule.name), stacklevel=3)
    return False


class Strategy:
    """How a run's epochs are trained: in this one process. Subclasses spread the work over
    processes (``torchrun``) by overriding what differs; :func:`fit` drives every one the same way.
    """

    name = "single"
    main = True  # this process reports and writes the run directory

    def place(self, device: torch.device) -> torch.device:
        """The device this process trains on, given the one asked for."""
        return device

    def setup(self, trainer: Trainer, loaders: Loaders) -> None:
        """Wire the trainer and loaders for this strategy (once, after any checkpoint is loaded)."""

    def describe(self) -> str:
        """How the run is spread, for its first line ("" for one process)."""
        return ""

    def record(self) -> dict[str, Any]:
        """What config.json records about the strategy."""
        return {}

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` (e.g. the checkpoint being resumed), on every process."""
        return value

    def agree(self, local: Callable[[], bool]) -> Callable[[], bool]:
        """A stop request every process sees at the same step."""
        return local

    def train_epoch(self, trainer: Trainer, loaders: Loaders, epoch: int, **options) -> EpochProgress:
        """Train one epoch; returns the sums over the whole batch (every process's share)."""
        return train_epoch(trainer, loaders.train, epoch, **options)

    def evaluate(self, trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool):
        return evaluate(trainer, loaders, epoch, blocks)

    def progress_record(self, progress: EpochProgress) -> dict[str, Any]:
        """What a mid-epoch checkpoint stores of an epoch in progress (called on every process)."""
        return progress.as_dict()

    def resume_progress(self, record: dict[str, Any]) -> EpochProgress:
        """This process's share of a stored epoch in progress."""
        return EpochProgress.from_dict(record)

    def trainer_state(self, trainer: Trainer) -> dict[str, Any]:
        """The whole trainer's state, on the main process (called on every process)."""
        return trainer.state_dict()

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def lost(self, error: RuntimeError) -> LLSError | None:
        """The user-facing error for a failure of the other processes (None: not such a failure)."""
        return None

    def close(self) -> None:
        """Leave whatever the strategy joined; called however the run ends."""


def check_epochs(epochs: int, start_epoch: int) -> None:
    """fit's epochs: at least 1, and not fewer than the epochs already trained."""
    if epochs < 1:
        raise LLSError(f"fit: epochs must be at least 1 (the epochs to train up to), got {epochs}")
    if not 0 <= start_epoch <= epochs:
        raise LLSError(f"fit: start_epoch must be from 0 to epochs ({epochs}), got {start_epoch}")


@checked
def fit(
    trainer: Trainer,
    loaders: Loaders | Iterable,
    epochs: int,
    *,
    test: Iterable | None = None,
    strategy: Strategy | None = None,
    start_epoch: int = 0,
    history: History | None = None,
    progress: bool = True,
    resume: EpochProgress | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    block_accuracy: bool = True,
) -> History:
    """Train from ``start_epoch`` (or ``resume``'s epoch and step) to ``epochs``, evaluating after
    each epoch with the paper's procedure; ``strategy`` says how (default: in this process).
    ``loaders``: :class:`Loaders`, or any re-iterable of training batches with ``test`` batches."""
    check_epochs(epochs, start_epoch)
    loaders = checked_loaders(Loaders, trainer, loaders, test, min_batch=BATCHNORM_MIN_BATCH)
    block_accuracy = block_accuracy and has_block_readout(trainer, loaders)
    strategy = strategy or Strategy()
    history = history or History()
    should_stop = strategy.agree(should_stop)
    if resume is not None:
        start_epoch = resume.epoch
    for epoch in range(start_epoch, epochs):
        done = strategy.train_epoch(
            trainer,
            loaders,
            epoch,
            progress=progress and strategy.main,
            desc=f"epoch {epoch + 1}/{epochs}",
            resume=resume if resume is not None and resume.epoch == epoch else None,
            should_stop=should_stop,
        )
        result, eval_seconds = strategy.evaluate(trainer, loaders, epoch, block_accuracy)
        if not math.isfinite(result.loss):
            raise TrainingDiverged(
                f"evaluation after epoch {epoch + 1} gave a test loss of {result.loss}; lower --lr"
            )
        lr = trainer.optimizers[0].param_groups[0]["lr"]  # this epoch's (block 0's, where lrs differ)
        trainer.end_epoch()  # before on_epoch checkpoints the trainer: a resume starts the next epoch
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=done.loss_sum / done.seen,
            train_accuracy=done.correct / done.seen,
            block_losses=[b / done.seen for b in done.block_sums],
            test_loss=result.loss,
            test_accuracy=result.accuracy,
            train_seconds=done.seconds,
            eval_seconds=eval_seconds,
            lr=lr,
            block_accuracy=result.block_accuracy,
            readout=result.readout,
            stage_busy=done.stage_busy,
        )
        history.records.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if epoch + 1 < epochs and should_stop():
            raise Interrupted(None)
    return history

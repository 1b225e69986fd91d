"""A whole run: configuration -> data -> trainer -> strategy -> run directory.

:func:`train_run` is what ``lls train`` and ``lls reproduce`` call: it loads the data, builds the
trainer, resumes it from the run's checkpoint if asked, lets the strategy (one process, data
parallel, pipeline) train it with :func:`~lls.training.fit.fit`, and after every epoch writes the checkpoint,
the metrics and the curves. Everything a user can get wrong is checked before the run directory is
created, so a refused command leaves nothing behind.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS, Dataset, drawn_on, load_dataset
from ..errors import LLSError
from ..measure.fits import check_training_fits
from ..method.models import applicable_options
from ..step.factory import build_trainer
from ..step.trainer import Trainer
from . import pipeline  # noqa: F401 (registers --parallel pipeline)
from .config import TrainConfig
from .distributed import STRATEGIES
from .fit import EpochProgress, EpochRecord, History, Interrupted, Loaders, Strategy, TrainingDiverged, fit
from .rundir import RunDir, check_progress, checkpoint_state, environment, read_state, set_rng_state

# curves.png takes 1-2 s to draw (matplotlib's layout), more than a GPU epoch: after the first epoch
# of a session it is redrawn at most this often, and always after the last epoch or a stop.
CURVES_SECONDS = 30.0


@dataclass
class Session:
    """A config's data, trainer and loaders: everything a run trains or evaluates with."""

    config: TrainConfig
    data: Dataset
    trainer: Trainer
    loaders: Loaders


def build_session(
    config: TrainConfig,
    *,
    device: torch.device,
    data_dir: str | None = None,
    download: bool = True,
    quiet: bool = False,
    draws: str | None = None,
) -> Session:
    """``draws``: the training loader's (``host``, ``device``; None: as the engine suits, below)."""
    data = load_dataset(
        config.dataset,
        data_dir,
        download=download,
        quiet=quiet,
        augment=config.augment,
        # a run recorded before options that do not apply were refused trained without them
        image_size=config.image_size if DATASETS.get(config.dataset).takes_image_size else None,
    )
    if config.holdout:
        data = data.hold_out(config.holdout)
    trainer = build_trainer(
        config.model,
        config.rule,
        data,
        rule_options=config.rule_options,
        model_options=applicable_options(config.model, config.model_options),
        seed=config.seed,
        device=device,
        channels_last=config.channels_last,
        optimizer=config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        engine=config.engine,
        memory=config.memory,
        lr_schedule=config.lr_schedule,
        epochs=config.epochs,
        precision=config.precision,
    )
    loaders = Loaders.for_dataset(
        data,
        config.batch_size,
        seed=config.seed,
        device=device,
        limit=config.limit,
        channels_last=config.channels_last,
        # A replayed graph step outruns host-side augmentation: the graph engine draws on the
        # device (another stream of numbers than the eager engine's, which stays bit-for-bit).
        draws=draws or ("auto" if trainer.engine is not None else "host"),
    )
    return Session(config, data, trainer, loaders)


def resumed_draws(progress: dict[str, Any] | None, device: torch.device, where: Path) -> str | None:
    """The draws an epoch in progress came from (``drawn_on``), so that its rest is the same
    permutation whatever engine resumes it; None: no epoch in progress, or no record of them."""
    recorded = (progress or {}).get("draws")
    if recorded in (None, "host", f"device:{device.type}"):
        return recorded and recorded.split(":")[0]
    raise LLSError(
        f"{where}: the epoch in progress drew its batches with {recorded!r} (its progress field "
        f"'draws') and this run is on {device.type}; resume it on that device"
    )


def load_trainer_state(trainer: Trainer, state: dict[str, Any], where: Path) -> None:
    try:
        trainer.load_state_dict(state["trainer"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LLSError(f"{where} does not fit the model ({first[:160]}); the checkpoint is damaged") from None


def open_trained(path: str | Path, *, device: torch.device, data_dir: str | None, download: bool):
    """(run, checkpoint state, session with the checkpoint loaded) of a run with an epoch or more."""
    run = RunDir.open(path)
    config = run.read_config()
    state = run.load_checkpoint()
    if state is None:
        raise LLSError(f"{run.path} has no checkpoint yet; train at least one epoch first")
    read_state(state, config, run.checkpoint_path)
    session = build_session(config, device=device, data_dir=data_dir, download=download, quiet=True)
    if state["progress"] is not None:
        check_progress(state["progress"], state["epoch"], len(session.loaders.train), run.checkpoint_path)
    load_trainer_state(session.trainer, state, run.checkpoint_path)
    return run, state, session


def create_strategy(parallel: str | None, device: torch.device, **options) -> Strategy:
    """The strategy of ``--parallel`` (None: this process alone), joining the process group."""
    return Strategy() if parallel is None else STRATEGIES.get(parallel)(device, **options)


# --- a whole run ----------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """How a run is carried out and shown; none of it changes what is learned."""

    device: torch.device
    data_dir: str | None = None
    download: bool = True
    progress: bool = True  # progress bars
    tensorboard: bool = False
    block_accuracy: bool = True  # each block's own test accuracy every epoch
    quiet_data: bool = False  # no download progress
    log: Callable[..., None] = print


@dataclass
class RunOutcome:
    status: str  # "finished", "interrupted" (checkpoint saved) or "diverged" (last good one kept)
    run: RunDir | None  # None on processes other than the main one
    session: Session
    history: History
    wall: float
    error: str | None = None


def train_run(
    config: TrainConfig,
    out: Path,
    options: RunOptions,
    *,
    resume: bool = False,
    strategy: Strategy | None = None,
) -> RunOutcome:
    """Train ``config`` in run directory ``out`` (a new one, or the one being resumed)."""
    strategy = strategy or Strategy()
    held: list[RunDir] = []  # the run directory this process locked, unlocked however the run ends
    try:
        return _train(config, out, options, resume, strategy, held)
    except RuntimeError as error:  # torch.distributed's errors are RuntimeErrors too
        lost = strategy.lost(error)
        if lost is None:
            raise
        raise lost from None
    finally:
        for run in held:
            run.unlock()
        strategy.close()


def _train(config, out, options: RunOptions, resume: bool, strategy: Strategy, held) -> RunOutcome:
    main = strategy.main
    log = options.log if main else (lambda *a, **k: None)
    run, state, draws = None, None, None
    device = strategy.place(options.device)
    if resume:  # the run's lock and its checkpoint's record checked before any data is loaded
        run, state = open_run(config, out, True, None, strategy, {})
        held.extend([run] if run is not None else [])
        if state is not None:
            read_state(state, config, out / "checkpoint.pt")
            draws = resumed_draws(state["progress"], device, out / "checkpoint.pt")
    session = build_session(
        config,
        device=device,
        data_dir=options.data_dir,
        download=options.download,
        quiet=options.quiet_data or not main,
        draws=draws,
    )
    strategy.setup(session.trainer, session.loaders)
    # refuses batches too small for BatchNorm on each process, and steps too big for the memory
    check_training_fits(session.trainer, max(map(len, session.loaders.train.batches()), default=0))
    if not resume:  # everything that can be refused has been checked: now the run directory
        run, state = open_run(config, out, False, session, strategy, {"data_dir": options.data_dir})
        held.extend([run] if run is not None else [])
    history, start_epoch, progress = History(), 0, None
    if state is not None:
        history, start_epoch, progress = restore(session, state, strategy, out / "checkpoint.pt")
    title = f"{config.model} / {config.dataset} / {describe_rule(config)}"
    if main and resume:
        run.record_resume(config)
        run.write_metrics(history, title)  # heal the metrics of a run killed after its checkpoint
    writer = tensorboard_writer(out / "tensorboard") if options.tensorboard and main else None
    log(first_line(session, out, state is not None, start_epoch, progress, strategy.describe()), flush=True)
    for record in history.records:
        log(epoch_line(record, config.epochs))

    plotted = {"at": None, "epochs": len(history.records)}  # when curves.png last matched the history

    def write_metrics(final: bool) -> None:
        now = time.monotonic()
        due = final or plotted["at"] is None or now - plotted["at"] >= CURVES_SECONDS
        run.write_metrics(history, title, plot=due)
        if due:
            plotted.update(at=now, epochs=len(history.records))

    def replot() -> None:  # a stopped run's curves show every epoch it finished
        if main and plotted["epochs"] != len(history.records):
            run.write_metrics(history, title)

    def on_epoch(record: EpochRecord) -> None:
        if main:
            run.save_checkpoint(
                checkpoint_state(config, session.trainer.state_dict(), history, record.epoch, None)
            )
            write_metrics(final=record.epoch == config.epochs)
            if writer is not None:
                log_scalars(writer, record)
            log(epoch_line(record, config.epochs), flush=True)

    start = time.perf_counter()
    try:
        with graceful_interrupt() as stop_requested:
            fit(
                session.trainer,
                session.loaders,
                config.epochs,
                strategy=strategy,
                start_epoch=start_epoch,
                history=history,
                progress=options.progress,
                resume=progress,
                on_epoch=on_epoch,
                should_stop=stop_requested,
                block_accuracy=options.block_accuracy,
            )
    except Interrupted as stop:
        replot()
        if stop.progress is not None:
            record = {**strategy.progress_record(stop.progress), "draws": drawn_on(session.loaders.train)}
            if main:
                trainer_state = session.trainer.state_dict()
                run.save_checkpoint(
                    checkpoint_state(config, trainer_state, history, stop.progress.epoch, record)
                )
        strategy.barrier()  # nobody leaves while rank 0 still writes
        return RunOutcome("interrupted", run, session, history, time.perf_counter() - start)
    except TrainingDiverged as error:
        replot()
        kept = f"the last good checkpoint (epoch {len(history.records)}) is kept in {out}"
        message = f"{error}; {kept if history.records else 'no checkpoint was written'}"
        return RunOutcome("diverged", run, session, history, time.perf_counter() - start, message)
    finally:
        if writer is not None:
            writer.close()
    strategy.barrier()  # everyone has finished before anyone leaves the group
    return RunOutcome("finished", run, session, history, time.perf_counter() - start)


def open_run(config: TrainConfig, out: Path, resume: bool, session: Session, strategy: Strategy, extra):
    """(run directory, checkpoint state or None): the main process creates (recording ``extra``
    in config.json) or opens and locks the directory; every process gets the checkpoint resumed."""
    run, state = None, None
    if strategy.main and resume:
        run = RunDir.open(out)
        run.lock()
        state = run.load_checkpoint()
    elif strategy.main:
        device = next(session.trainer.net.parameters()).device
        where = {"device": str(device), "data_source": session.data.source, **extra, **strategy.record()}
        run = RunDir.create(out, config, {**environment(), **where})
    return run, strategy.broadcast(state)


def restore(session: Session, state: dict[str, Any], strategy: Strategy, where: Path):
    """Load a checkpoint into a freshly built session; returns (history, epoch, progress)."""
    history, epoch, record = read_state(state, session.config, where)
    if record is not None:
        check_progress(record, epoch, len(session.loaders.train), where)
    if session.config.epochs < epoch:
        raise LLSError(
            f"{where.parent} has trained {epoch} epochs already; resume with --epochs {epoch} or more"
        )
    load_trainer_state(session.trainer, state, where)
    set_rng_state(state["rng"])
    progress = strategy.resume_progress(record) if record is not None else None
    return history, epoch, progress


def describe_rule(config: TrainConfig) -> str:
    rule = config.rule_config().items()
    options = ", ".join(f"{k}={v}" for k, v in rule if k != "name" and v is not None)
    model = ", ".join(f"{k}={v}" for k, v in config.model_options.items())
    return f"{config.rule}({options})" + (f" on {config.model}({model})" if model else "")


def first_line(session, out, resumed, epoch, progress: EpochProgress | None, spread: str) -> str:
    config, loaders = session.config, session.loaders
    where = f"resuming {out} at epoch {epoch + 1}" if resumed else f"run {out}"
    if progress is not None:
        where += f", step {progress.step}"
    if spread:
        where += f" ({spread})"
    device = next(session.trainer.net.parameters()).device
    return (
        f"{where}: {config.model} on {config.dataset} ({len(loaders.train.labels)} train / "
        f"{len(loaders.test.labels)} test, from {session.data.source}) with {describe_rule(config)}, "
        f"{config.optimizer} lr {config.lr}, batch {config.batch_size}, seed {config.seed}, {device}"
    )


def epoch_line(record: EpochRecord, epochs: int) -> str:
    blocks = " ".join(f"{b:.3f}" for b in record.block_losses)
    accuracies = " ".join(f"{100 * b:.1f}" for b in record.block_accuracy)
    busy = ", ".join(f"{b:.2f}" for b in record.stage_busy)
    return (
        f"epoch {record.epoch}/{epochs}: train loss {record.train_loss:.4f} "
        f"acc {100 * record.train_accuracy:.2f}% | test loss {record.test_loss:.4f} "
        f"acc {100 * record.test_accuracy:.2f}% | {record.train_seconds:.1f}s train, "
        f"{record.eval_seconds:.1f}s eval"
        + (f" | block losses {blocks}" if blocks else "")
        + (f" | block acc ({record.readout}) {accuracies}" if accuracies else "")
        + (f" | stages busy {busy}" if busy else "")
    )


def tensorboard_writer(path: Path | None):
    """A TensorBoard writer logging to ``path`` (None: only check that the package is there)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LLSError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return None if path is None else SummaryWriter(str(path))


def log_scalars(writer, record: EpochRecord) -> None:
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_seconds"):
        writer.add_scalar(key, getattr(record, key), record.epoch)
    for b, value in enumerate(record.block_losses):
        writer.add_scalar(f"block_loss/{b}", value, record.epoch)
    for b, value in enumerate(record.block_accuracy):
        writer.add_scalar(f"block_accuracy/{b}", value, record.epoch)
    writer.flush()


@contextmanager
def graceful_interrupt() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C (or SIGTERM) asks training to stop at the next step; a second one aborts."""
    requested = {"stop": False}

    def handler(signum, frame):
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        print(
            "\nlls: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr
        )

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield lambda: requested["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

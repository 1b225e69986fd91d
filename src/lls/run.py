"""A training run as a directory: configuration, metrics, checkpoints and curves.

``runs/NAME/config.json``   everything needed to rerun (library version, seed, every option)
``runs/NAME/metrics.jsonl`` one line per epoch (and ``metrics.csv``)
``runs/NAME/checkpoint.pt`` model, every optimizer's state, RNG states, history, progress
``runs/NAME/curves.png``    accuracy, loss and per-block local-loss curves

Checkpoints are written atomically (temp file, fsync, rename), so a run killed at any moment
resumes from its last complete checkpoint; the metrics files are rewritten from the checkpoint's
history, which is the source of truth. Checkpoints load with ``weights_only=True``: nothing in the
file is executed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import Dataset, load_dataset
from .errors import LLSError
from .fit import EpochProgress, EpochRecord, History, Loaders
from .models import create_model
from .rules import Rule, create_rule
from .trainer import Trainer

CHECKPOINT_FORMAT = "lls-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """What defines a run. Two runs with equal configs train identically on the CPU."""

    dataset: str = "fashion-mnist"
    model: str = "smallconv"
    rule: str = "lls"
    rule_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw-sf"
    seed: int = 0
    limit: int | None = None
    augment: str | None = None
    image_size: int | None = None
    channels_last: bool = True
    holdout: int | None = None  # evaluate on this many held-out training images instead of the test set

    # may differ when a run is resumed: more epochs, another device, files moved
    RESUMABLE = ("epochs",)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise LLSError(f"config has unknown keys {sorted(unknown)}; was it written by another version?")
        return cls(**values)

    def default_name(self) -> str:
        basis = create_rule(self.rule, **self.rule_options).config().get("basis")
        parts = [self.dataset, self.model, self.rule + (f"-{basis}" if basis else ""), f"s{self.seed}"]
        return "-".join(parts) + time.strftime("-%Y%m%d-%H%M%S")


@dataclass
class Session:
    """Everything a run trains with, built from a config."""

    config: TrainConfig
    data: Dataset
    rule: Rule
    trainer: Trainer
    loaders: Loaders
    device: torch.device


HOLDOUT_SEED = "holdout"  # the validation split is fixed, whatever the run's seed


def hold_out(data: Dataset, count: int) -> Dataset:
    """The dataset with ``count`` training images (a fixed random choice) as its evaluation split.

    For tuning without looking at the test set: the held-out images leave the training set, and
    every "test" figure of the run is measured on them (the run's config records it)."""
    from .data import FileSplit, Split, seeded_generator

    n = len(data.train)
    if not 0 < count < n:
        raise LLSError(f"--holdout takes between 1 and {n - 1} images for {data.name}, got {count}")
    order = torch.randperm(n, generator=seeded_generator(HOLDOUT_SEED, data.name))
    keep, held = order[count:].sort().values, order[:count].sort().values
    train = data.train
    if isinstance(train, Split):
        fit, val = (
            Split(train.images[keep], train.labels[keep]),
            Split(train.images[held], train.labels[held]),
        )
    else:

        def pick(idx: torch.Tensor, crop: bool) -> FileSplit:
            files = [train.files[i] for i in idx.tolist()]
            return FileSplit(files, train.labels[idx], train.size, train.resize, crop)

        fit, val = pick(keep, train.random_crop), pick(held, False)  # no random crops to evaluate on
    return dataclasses.replace(data, name=f"{data.name} (holdout)", train=fit, test=val)


def build_session(
    config: TrainConfig,
    *,
    device: torch.device,
    data_dir: str | None = None,
    download: bool = True,
    quiet: bool = False,
) -> Session:
    rule = create_rule(config.rule, **config.rule_options)
    data = load_dataset(
        config.dataset,
        data_dir,
        download=download,
        quiet=quiet,
        augment=config.augment,
        image_size=config.image_size,
    )
    if config.holdout:
        data = hold_out(data, config.holdout)
    torch.manual_seed(config.seed)  # the network's (and rule's) initial weights
    net = create_model(
        config.model,
        in_channels=data.input_shape[0],
        input_size=data.input_shape[1:],
        num_classes=data.num_classes,
        activation=rule.activation,
    ).to(device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    trainer = Trainer(
        net,
        rule,
        input_shape=data.input_shape,
        optimizer=config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    loaders = Loaders.for_dataset(
        data,
        config.batch_size,
        seed=config.seed,
        device=device,
        limit=config.limit,
        channels_last=config.channels_last,
    )
    return Session(config, data, rule, trainer, loaders, device)


# --- the run directory ----------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.metrics_jsonl = self.path / "metrics.jsonl"
        self.metrics_csv = self.path / "metrics.csv"
        self.curves = self.path / "curves.png"

    @classmethod
    def create(cls, path: str | Path, config: TrainConfig, extra: dict[str, Any]) -> RunDir:
        run = cls(path)
        if run.config_path.exists() or run.checkpoint_path.exists():
            raise LLSError(
                f"{run.path} already holds a run; continue it with `lls train --resume {run.path}` "
                "or choose another --out"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        record = {"config": config.as_dict(), **extra}
        _atomic_write(run.config_path, (json.dumps(record, indent=2) + "\n").encode())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.path.is_dir():
            raise LLSError(f"run directory {run.path} does not exist")
        if not run.config_path.is_file():
            raise LLSError(f"{run.path} is not an lls run directory (no config.json)")
        return run

    def record_resume(self, config: TrainConfig) -> None:
        """A resumed run may train for more epochs: config.json keeps saying what the run is (its
        epochs the new target) and lists when, how and by which code it was extended."""
        record = json.loads(self.config_path.read_text())
        if record["config"] == config.as_dict():
            return
        change = {"epochs": [record["config"]["epochs"], config.epochs]}
        record["config"] = config.as_dict()
        keep = ("commit", "lls_version", "torch_version", "command", "created")
        now = environment()
        record.setdefault("resumed", []).append({**change, **{k: now[k] for k in keep}})
        _atomic_write(self.config_path, (json.dumps(record, indent=2) + "\n").encode())

    def read_config(self) -> TrainConfig:
        try:
            record = json.loads(self.config_path.read_text())
            return TrainConfig.from_dict(record["config"])
        except (ValueError, KeyError, TypeError) as error:
            raise LLSError(f"{self.config_path} is not a valid lls run config ({error})") from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
        _atomic_write(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last complete checkpoint, or None if the run never finished a checkpoint."""
        if not self.checkpoint_path.exists():
            return None
        return load_checkpoint_file(self.checkpoint_path)

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        _atomic_write(self.metrics_jsonl, lines.encode())
        if not records:
            return
        losses, accuracies = len(records[0]["block_losses"]), len(records[0].get("block_accuracy", []))
        scalar = [k for k, v in records[0].items() if not isinstance(v, list)]
        out = io.StringIO()
        writer = csv.writer(out)
        header = scalar + [f"block_{b}_loss" for b in range(losses)]
        writer.writerow(header + [f"block_{b}_accuracy" for b in range(accuracies)])
        for r in records:
            writer.writerow([r[k] for k in scalar] + r["block_losses"] + r.get("block_accuracy", []))
        _atomic_write(self.metrics_csv, out.getvalue().encode())

    def plot(self, records: list[dict[str, Any]], title: str) -> None:
        from .plots import plot_curves

        if records:
            plot_curves(records, self.curves, title)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure means "not a checkpoint we can read"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LLSError(f"{path} is not a readable lls checkpoint ({first[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LLSError(
            f"{path} is not an lls checkpoint (no lls format marker); it cannot be resumed or evaluated"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise LLSError(
            f"{path} is an lls checkpoint of format version {state.get('version')}, not {CHECKPOINT_VERSION}"
        )
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str:
    """The commit of the lls source tree (with ``+dirty`` for local changes), or ``unknown``."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    return {
        "lls_version": __version__,
        "commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextmanager
def graceful_interrupt() -> Iterator[callable]:
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


def checkpoint_state(
    session: Session, history: History, epoch: int, progress: EpochProgress | None, trainer_state=None
) -> dict[str, Any]:
    return {
        "config": session.config.as_dict(),
        "epoch": epoch,  # completed epochs
        "progress": progress.as_dict() if progress is not None else None,
        "trainer": trainer_state if trainer_state is not None else session.trainer.state_dict(),
        "history": [r.as_dict() for r in history.records],
        "rng": rng_state(),
    }


def load_trainer_state(trainer: Trainer, state: dict[str, Any]) -> None:
    try:
        trainer.load_state_dict(state["trainer"])
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0]
        raise LLSError(f"the checkpoint does not fit the model ({first[:160]})") from None


def open_trained(path: str | Path, *, device: torch.device, data_dir: str | None, download: bool):
    """(run, config, checkpoint state, session with the checkpoint loaded) of a finished epoch or more."""
    run = RunDir.open(path)
    config = run.read_config()
    state = run.load_checkpoint()
    if state is None:
        raise LLSError(f"{run.path} has no checkpoint yet; train at least one epoch first")
    session = build_session(config, device=device, data_dir=data_dir, download=download, quiet=True)
    load_trainer_state(session.trainer, state)
    return run, config, state, session


def restore(session: Session, state: dict[str, Any]) -> tuple[History, int, EpochProgress | None]:
    """Load a checkpoint into a freshly built session; returns (history, epoch, progress)."""
    saved = TrainConfig.from_dict(state["config"])
    if dataclasses.replace(saved, epochs=0) != dataclasses.replace(session.config, epochs=0):
        raise LLSError(
            "the checkpoint was written by a run with another configuration; it cannot be resumed here"
        )
    load_trainer_state(session.trainer, state)
    set_rng_state(state["rng"])
    history = History([EpochRecord(**r) for r in state["history"]])
    progress = EpochProgress(**state["progress"]) if state["progress"] is not None else None
    return history, state["epoch"], progress


# --- a whole run ----------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    status: str  # "finished", "interrupted" (checkpoint saved) or "diverged" (last good one kept)
    run: RunDir
    session: Session
    history: History
    wall: float
    error: str | None = None


def epoch_line(record: EpochRecord, epochs: int) -> str:
    blocks = " ".join(f"{b:.3f}" for b in record.block_losses)
    accuracies = " ".join(f"{100 * b:.1f}" for b in record.block_accuracy)
    return (
        f"epoch {record.epoch}/{epochs}: train loss {record.train_loss:.4f} "
        f"acc {100 * record.train_accuracy:.2f}% | test loss {record.test_loss:.4f} "
        f"acc {100 * record.test_accuracy:.2f}% | {record.train_seconds:.1f}s train, "
        f"{record.eval_seconds:.1f}s eval"
        + (f" | block losses {blocks}" if blocks else "")
        + (f" | block acc ({record.readout}) {accuracies}" if accuracies else "")
    )


def tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LLSError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(path))


def _leaves_process_group(train):
    """However a run ends, its process leaves the process group before returning: gloo's threads
    abort the interpreter at exit ("terminate called without an active exception") otherwise."""

    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        from . import distributed

        try:
            return train(*args, **kwargs)
        finally:
            distributed.leave()

    return wrapper


@_leaves_process_group
def train_run(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    device: torch.device,
    data_dir: str | None = None,
    download: bool = True,
    progress: bool = True,
    tensorboard: bool = False,
    quiet_data: bool = False,
    block_accuracy: bool = True,
    log=print,
    parallel: str | None = None,
    stages: str | None = None,
    sync_bn: bool = False,
    dist_timeout: float = 300.0,
) -> RunOutcome:
    """Train ``config`` in run directory ``out`` (a new one, or the one being resumed).

    With ``parallel`` ("ddp" or "pipeline") this is one of the processes ``torchrun`` started; rank 0
    writes the run directory, the others stay quiet.
    """
    from . import distributed
    from .fit import Interrupted, TrainingDiverged, fit

    ctx = None
    if parallel is not None:
        if parallel not in ("ddp", "pipeline"):
            raise LLSError(f"unknown --parallel {parallel!r}; use ddp or pipeline")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        ctx = distributed.init(device, dist_timeout)
    main = ctx is None or ctx.main
    if not main:
        log, progress, tensorboard = (lambda *a, **k: None), False, False

    run = RunDir.open(out) if resume and main else None
    state = run.load_checkpoint() if run is not None else None
    if ctx is not None and resume:
        shared = [state]
        torch.distributed.broadcast_object_list(shared, 0)
        state = shared[0]
    session = build_session(
        config, device=device, data_dir=data_dir, download=download, quiet=quiet_data or not main
    )
    if sync_bn:
        session.trainer.net = distributed.convert_sync_batchnorm(session.trainer.net, device)
    if main and run is None:
        extra = {"device": str(device), "data_dir": data_dir, "data_source": session.data.source}
        if ctx is not None:
            extra.update(parallel=parallel, world_size=ctx.world, stages=stages, sync_bn=sync_bn)
        run = RunDir.create(out, config, {**environment(), **extra})
    if ctx is not None:
        torch.distributed.barrier()  # the run directory exists before anyone writes
    history, start_epoch, progress_state = History(), 0, None
    if state is not None:
        history, start_epoch, progress_state = restore(session, state)
        if progress_state is not None and not main:  # the saved sums are global: rank 0 carries them
            progress_state = EpochProgress(
                progress_state.epoch, progress_state.step, seconds=progress_state.seconds
            )
    if main and resume:
        run.record_resume(config)
    trainer, loaders, rule = session.trainer, session.loaders, session.rule
    describe = ", ".join(f"{k}={v}" for k, v in rule.config().items() if k != "name")
    where = f"resuming {out} at epoch {start_epoch + 1}" if state is not None else f"run {out}"
    if progress_state is not None:
        where += f", step {progress_state.step}"
    if ctx is not None:
        where += f" ({parallel} over {ctx.world} processes, {ctx.backend})"
    log(
        f"{where}: {config.model} on {config.dataset} ({len(loaders.train.labels)} train / "
        f"{len(loaders.test.labels)} test, from {session.data.source}) with {rule.name}({describe}), "
        f"{config.optimizer} lr {config.lr}, batch {config.batch_size}, seed {config.seed}, {device}",
        flush=True,
    )
    for record in history.records:
        log(epoch_line(record, config.epochs))
    writer = tensorboard_writer(out / "tensorboard") if tensorboard else None
    title = f"{config.model} / {config.dataset} / {rule.name} ({describe})"

    def save(record: EpochRecord, trainer_state=None) -> None:
        run.save_checkpoint(checkpoint_state(session, history, record.epoch, None, trainer_state))
        records = [r.as_dict() for r in history.records]
        run.write_metrics(records)
        run.plot(records, title)
        if writer is not None:
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_seconds"):
                writer.add_scalar(key, getattr(record, key), record.epoch)
            for b, value in enumerate(record.block_losses):
                writer.add_scalar(f"block_loss/{b}", value, record.epoch)
            for b, value in enumerate(record.block_accuracy):
                writer.add_scalar(f"block_accuracy/{b}", value, record.epoch)
            writer.flush()
        log(epoch_line(record, config.epochs), flush=True)

    def on_epoch(record: EpochRecord) -> None:
        if main:
            save(record)

    start = time.perf_counter()
    try:
        with graceful_interrupt() as local_stop:
            if parallel == "pipeline":
                from .cost import count_costs

                blocks = len(trainer.net.blocks)
                if stages:
                    layout = distributed.parse_stages(stages, blocks)
                else:
                    report = count_costs(
                        config.model, rule, session.data.input_shape, session.data.num_classes
                    )
                    costs = [b.forward + b.weight_grad + b.signal_mults for b in report.blocks[:-1]]
                    layout = distributed.balance_stages(costs, ctx.world)
                if progress_state is not None:
                    raise LLSError(
                        "this checkpoint is mid-epoch; finish that epoch without --parallel pipeline first"
                    )
                stage = distributed.PipelineStage(ctx, trainer, layout, session.data.input_shape)
                log(f"stages: {', '.join(f'{r.start}-{r.stop - 1}' for r in layout)}", flush=True)

                distributed.pipeline_fit(
                    ctx,
                    stage,
                    loaders,
                    layout,
                    config.epochs,
                    start_epoch=start_epoch,
                    history=history,
                    on_epoch=save,
                    should_stop=local_stop,
                    block_accuracy=block_accuracy,
                    lr=config.lr,
                )
            else:
                options = {}
                if parallel == "ddp":
                    dp = distributed.DataParallel(ctx, trainer, loaders)
                    options = {
                        "evaluator": dp.evaluator,
                        "reduce": dp.reduce,
                        "should_stop": dp.should_stop(local_stop),
                    }
                fit(
                    trainer,
                    loaders,
                    config.epochs,
                    start_epoch=start_epoch,
                    history=history,
                    progress=progress,
                    resume=progress_state,
                    on_epoch=on_epoch,
                    block_accuracy=block_accuracy,
                    **{"should_stop": local_stop, **options},
                )
    except Interrupted as stop:
        if stop.progress is not None:
            progress_now = dp.reduce(stop.progress) if parallel == "ddp" else stop.progress
            if main:
                run.save_checkpoint(checkpoint_state(session, history, stop.progress.epoch, progress_now))
        if ctx is not None:  # every rank stopped together; none leaves while rank 0 still writes
            torch.distributed.barrier()
        return RunOutcome("interrupted", run, session, history, time.perf_counter() - start)
    except TrainingDiverged as error:
        kept = f"the last good checkpoint (epoch {len(history.records)}) is kept in {out}"
        message = f"{error}; {kept if history.records else 'no checkpoint was written'}"
        return RunOutcome("diverged", run, session, history, time.perf_counter() - start, message)
    except (RuntimeError, torch.distributed.DistError) as error:
        if ctx is None:
            raise
        raise distributed.lost_peer(error, ctx) from None
    finally:
        if writer is not None:
            writer.close()
    if ctx is not None:
        torch.distributed.barrier()  # everyone has finished before anyone leaves the group
    return RunOutcome("finished", run, session, history, time.perf_counter() - start)

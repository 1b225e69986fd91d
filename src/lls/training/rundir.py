"""A training run as a directory: configuration, metrics, checkpoints and curves.

``runs/NAME/config.json``   everything needed to rerun (library version, seed, every option)
``runs/NAME/metrics.jsonl`` one line per epoch (and ``metrics.csv``)
``runs/NAME/checkpoint.pt`` model, every optimizer's state, RNG states, history, progress
``runs/NAME/curves.png``    accuracy, loss and per-block local-loss curves

The checkpoint is the source of truth: the metrics files and the curves are rewritten from its
history after every epoch and whenever a run is resumed, so a run killed between the two heals.
Every file is written atomically (``files.atomic_write``); a lock keeps two processes from writing
one run. Checkpoints load with ``weights_only=True`` (nothing in the file is executed) and carry a
SHA-256 of their payload, checked on load.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import LLSError
from ..measure.plots import plot_curves
from ..options import flag
from .config import RESUMABLE, TrainConfig
from .files import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILES,
    Lock,
    atomic_write,
    check_folder,
    describe_os_error,
    name_too_long,
    remove_stale_temp_files,
)
from .fit import EpochProgress, EpochRecord, History

CHECKPOINT_FORMAT = "lls-checkpoint"
CHECKPOINT_VERSION = 2  # 2: the state is a payload with its SHA-256; 1 (still read): the state itself


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_path = self.path / CHECKPOINT_FILE
        self.metrics_jsonl, self.metrics_csv = (self.path / name for name in METRICS_FILES)
        self.curves = self.path / CURVES_FILE
        self._lock = Lock(self.path)

    @classmethod
    def create(cls, path: str | Path, config: TrainConfig, extra: dict[str, Any]) -> RunDir:
        """A new run directory holding ``config.json``, locked by this process."""
        run = cls(path)
        problem = name_too_long(run.path)
        if problem is not None:
            raise LLSError(f"--out: {problem}")
        if run.path.exists() and not run.path.is_dir():
            raise LLSError(f"--out {run.path} is a file, not a folder; choose another --out")
        if run.config_path.exists() or run.checkpoint_path.exists():
            raise LLSError(
                f"{run.path} already holds a run; continue it with `lls train --resume {run.path}` "
                "or choose another --out"
            )
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LLSError(describe_os_error(error, run.path)) from None
        run.lock()
        record = {"config": config.as_dict(), **extra}
        atomic_write(run.config_path, (json.dumps(record, indent=2) + "\n").encode())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(check_folder(path, "run directory"))
        if not run.config_path.is_file():
            raise LLSError(f"{run.path} is not an lls run directory (no config.json)")
        return run

    def lock(self) -> None:
        """Take the run's lock (held until the process ends or :meth:`unlock`) and clear the temp
        files a killed writer left."""
        self._lock.acquire()
        remove_stale_temp_files(self.path)

    def unlock(self) -> None:
        self._lock.release()

    # --- config.json -------------------------------------------------------------------------

    def read_record(self) -> dict[str, Any]:
        try:
            record = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as error:
            raise LLSError(
                f"{self.config_path} is damaged (not readable JSON: {' '.join(str(error).split())[:100]}); "
                "restore it from a copy"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise LLSError(f'{self.config_path} has no "config" object; restore it')
        return record

    def read_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.read_record()["config"], where=f"{self.config_path}: ")

    def record_resume(self, config: TrainConfig) -> None:
        """A resumed run may train for more epochs: config.json keeps saying what the run is (its
        epochs the new target) and lists when, how and by which code it was extended."""
        record = self.read_record()
        if record["config"] == config.as_dict():
            return
        new = config.as_dict()
        change = {k: [record["config"].get(k), v] for k, v in new.items() if record["config"].get(k) != v}
        record["config"] = new
        keep = ("commit", "lls_version", "torch_version", "command", "created")
        now = environment()
        record.setdefault("resumed", []).append({**change, **{k: now[k] for k in keep}})
        atomic_write(self.config_path, (json.dumps(record, indent=2) + "\n").encode())

    # --- checkpoint.pt -----------------------------------------------------------------------

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        payload = io.BytesIO()
        torch.save(state, payload)
        payload = payload.getvalue()
        outer = io.BytesIO()
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload,
            },
            outer,
        )
        atomic_write(self.checkpoint_path, outer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last complete checkpoint, or None if the run never finished a checkpoint."""
        if not self.checkpoint_path.exists():
            return None
        return load_checkpoint_file(self.checkpoint_path)

    # --- metrics and curves ------------------------------------------------------------------

    def write_metrics(self, history: History, title: str, *, plot: bool = True) -> None:
        """Rewrite metrics.jsonl, metrics.csv and (with ``plot``) curves.png from the history."""
        records = [r.as_dict() for r in history.records]
        atomic_write(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in records).encode())
        if not records:
            return
        losses, accuracies = len(records[0]["block_losses"]), len(records[0]["block_accuracy"])
        scalar = [k for k, v in records[0].items() if not isinstance(v, list)]
        out = io.StringIO()
        writer = csv.writer(out)
        header = scalar + [f"block_{b}_loss" for b in range(losses)]
        writer.writerow(header + [f"block_{b}_accuracy" for b in range(accuracies)])
        for r in records:
            writer.writerow([r[k] for k in scalar] + r["block_losses"] + r["block_accuracy"])
        atomic_write(self.metrics_csv, out.getvalue().encode())
        if not plot:
            return
        plot_curves(records, self.curves, title)

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's rows, each checked to be an epoch's record (the file is for people and
        tools; the checkpoint is the source of truth, and a resume rewrites the file from it)."""
        if not self.metrics_jsonl.is_file():
            return []
        fix = "resume the run (`lls train --resume`) to rewrite it from the checkpoint"
        try:
            text = self.metrics_jsonl.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise LLSError(f"{self.metrics_jsonl} is not text (byte {error.start}); {fix}") from None
        except OSError as error:
            raise LLSError(describe_os_error(error, self.metrics_jsonl)) from None
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise LLSError(f"{self.metrics_jsonl} line {number} is not JSON; {fix}") from None
            problem = record_problem(row)
            if problem is not None:
                raise LLSError(f"{self.metrics_jsonl} line {number} {problem}; {fix}")
            rows.append(row)
        return rows


def record_problem(row: Any) -> str | None:
    """Why ``row`` is not an epoch's record (:class:`EpochRecord` as a dict), or None."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not an epoch's record"
    fields = {f.name: f for f in dataclasses.fields(EpochRecord)}
    missing = [name for name, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = sorted(set(missing) - set(row))
    if missing:
        return f"lacks the fields {missing}"
    unknown = sorted(set(row) - set(fields))
    if unknown:
        return f"has unknown fields {unknown}"

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for name, value in row.items():
        kind = fields[name].type
        if name == "epoch":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif kind == "float":
            ok = number(value)
        elif kind.startswith("list"):
            ok = isinstance(value, list) and all(number(v) for v in value)
        else:  # the readout's name
            ok = value is None or isinstance(value, str)
        if not ok:
            return f"has {name} = {value!r}"
    return None


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A checkpoint's state, after checking its format marker and its payload's SHA-256."""
    outer = _torch_load(path, path.read_bytes() if path.is_file() else b"")
    if not isinstance(outer, dict) or outer.get("format") != CHECKPOINT_FORMAT:
        raise LLSError(f"{path} is damaged or not an lls checkpoint (no lls format marker); {DAMAGED_FIX}")
    version = outer.get("version")
    if version == 1:
        state = outer  # written before checksums: nothing to verify
    elif version == CHECKPOINT_VERSION:
        payload = outer.get("payload")
        if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
            raise LLSError(f"{path} is damaged (its checksum does not match); {DAMAGED_FIX}")
        state = _torch_load(path, payload)
    else:
        raise LLSError(
            f"{path} is damaged or from another lls (checkpoint format version {version!r}, not "
            f"{CHECKPOINT_VERSION}); {DAMAGED_FIX}"
        )
    if not isinstance(state, dict):
        raise LLSError(f"{path} is damaged (it holds no checkpoint state); {DAMAGED_FIX}")
    return state


DAMAGED_FIX = "resume from a copy, or delete it to start the run over"


def _torch_load(path: Path, data: bytes) -> Any:
    if not data:
        raise LLSError(f"{path} is damaged (it is empty); {DAMAGED_FIX}")
    try:
        with warnings.catch_warnings():  # torch's warnings about a bad file would print before the line
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # any failure means the bytes are not the checkpoint lls wrote
        first = " ".join(str(error).split()) or type(error).__name__
        raise LLSError(f"{path} is damaged (unreadable: {first[:100]}); {DAMAGED_FIX}") from None


# --- what a checkpoint holds ------------------------------------------------------------------


def checkpoint_state(
    config: TrainConfig,
    trainer_state: dict[str, Any],
    history: History,
    epoch: int,
    progress: dict[str, Any] | None,
) -> dict[str, Any]:
    """``progress``: the strategy's record of an epoch in progress (None at an epoch boundary)."""
    return {
        "config": config.as_dict(),
        "epoch": epoch,  # completed epochs
        "progress": progress,
        "trainer": trainer_state,
        "history": [r.as_dict() for r in history.records],
        "rng": rng_state(),
    }


def read_state(state: dict[str, Any], config: TrainConfig, where: Path) -> tuple[History, int, Any]:
    """(history, completed epochs, progress record) of a checkpoint, every field checked and named
    on error; refuses a checkpoint of another configuration."""

    def bad(field: str, why: str) -> LLSError:
        return LLSError(f"{where} field {field!r} {why}; the checkpoint is damaged: resume from a copy")

    for key in ("config", "epoch", "progress", "trainer", "history", "rng"):
        if key not in state:
            raise bad(key, "is missing")
    saved = TrainConfig.from_dict(state["config"], where=f"{where} field 'config': ")
    old, new = saved.as_dict(), config.as_dict()
    conflicts = [
        f"{flag(k)} {new[k]!r} (the checkpoint has {old[k]!r})"
        for k in new
        if k not in RESUMABLE and old[k] != new[k]
    ]
    if conflicts:
        raise LLSError(
            f"{where} was written by a run with another configuration: {'; '.join(conflicts)}; "
            "restore the run's config.json, or start a new run with --out"
        )
    epoch, history = state["epoch"], state["history"]
    if not isinstance(epoch, int) or epoch < 0:
        raise bad("epoch", f"is {epoch!r}, not a number of epochs")
    if not isinstance(history, list) or len(history) != epoch:
        raise bad("history", f"does not hold {epoch} epoch records")
    try:
        records = [EpochRecord(**r) for r in history]
    except TypeError as error:
        raise bad("history", f"has a record that is not an epoch ({error})") from None
    progress = state["progress"]
    if progress is not None and not isinstance(progress, dict):
        raise bad("progress", f"is {type(progress).__name__}, not a record of an epoch in progress")
    if progress is not None:
        check_progress(progress, epoch, None, where)
    if not isinstance(state["rng"], dict) or not isinstance(state["rng"].get("torch"), torch.Tensor):
        raise bad("rng", "holds no random-number-generator state")
    if not isinstance(state["trainer"], dict):
        raise bad("trainer", "holds no trainer state")
    return History(records), epoch, progress


PROGRESS_REQUIRED = {"epoch", "step", "loss_sum", "correct", "seen", "seconds"}
PROGRESS_EXTRA = {"ranks", "draws"}  # a data-parallel run's per-process sums; the loader's data path


def check_progress(progress: dict[str, Any], epoch: int, steps: int | None, where: Path) -> None:
    """Refuse a progress record that cannot be the epoch in progress of a checkpoint after ``epoch``
    completed epochs, of ``steps`` steps (None: not known yet), naming the field."""

    def bad(why: str) -> LLSError:
        return LLSError(f"{where} field 'progress' {why}; the checkpoint is damaged: resume from a copy")

    unknown = sorted(set(progress) - {f.name for f in dataclasses.fields(EpochProgress)} - PROGRESS_EXTRA)
    if unknown:
        raise bad(f"has unknown fields {unknown}")
    missing = sorted(PROGRESS_REQUIRED - set(progress))
    if missing:
        raise bad(f"lacks the fields {missing}")
    try:
        record = EpochProgress.from_dict(progress)
    except (TypeError, ValueError) as error:
        raise bad(f"is not a record of an epoch in progress ({error})") from None
    if record.epoch != epoch:
        raise bad(f"is of epoch {record.epoch + 1}, not of epoch {epoch + 1} that follows the saved ones")
    if record.seen < record.step or record.correct > record.seen:
        raise bad(f"counts {record.seen} images ({record.correct} correct) in {record.step} steps")
    if steps is not None and record.step >= steps:
        raise bad(f"says step {record.step} of an epoch of {steps} steps")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- where a run came from --------------------------------------------------------------------


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

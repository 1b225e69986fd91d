"""``lls.save_run``: a trainer trained from the API, written as a run directory.

What ``lls train`` writes (``rundir.py``: config.json, checkpoint.pt, metrics, curves), from a
trainer and its :class:`~lls.training.fit.History`, so that ``lls eval``, ``lls predict``,
``lls export`` and ``lls train --resume`` read it as any run. A run is rebuilt from its config:
the model is a zoo name, or an importable factory ``"package.module:function"`` that returns the
network (``models.py``); the optimizer, the schedule and the data are named as ``lls train`` names
them. What cannot be recorded that way is refused before anything is written, in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..checks import checked
from ..data import DATASETS
from ..errors import LLSError
from ..method.models import is_factory
from ..step.config import StepConfig
from ..step.factory import build_trainer
from ..step.trainer import Trainer
from .config import DEFAULTS, TrainConfig
from .fit import History
from .rundir import RunDir, checkpoint_state, environment

MODEL_HELP = (
    "a zoo model's name (lls list) or an importable factory 'package.module:function' that returns "
    "the network, called as function(input_shape=(C, H, W), num_classes=K, **model_options)"
)


@checked
def save_run(
    trainer: Trainer,
    path: str | Path,
    history: History,
    *,
    model: str,
    dataset: str,
    model_options: dict[str, Any] | None = None,
    optimizer: str | None = None,
    seed: int = DEFAULTS.seed,
    batch_size: int = DEFAULTS.batch_size,
    limit: int | None = DEFAULTS.limit,
    holdout: int | None = DEFAULTS.holdout,
    augment: str | None = DEFAULTS.augment,
    channels_last: bool = False,
) -> Path:
    """Write ``trainer`` (after ``history``'s epochs of ``lls.fit``) as the run directory ``path``.

    ``model``: how the run's network is rebuilt (:data:`MODEL_HELP`), with ``model_options``;
    ``dataset``: the registered dataset it trained on (``lls list``; ``limit``, ``holdout`` and
    ``augment`` as ``lls train``'s), which ``lls eval``, ``predict`` and ``--resume`` read again.
    ``optimizer``: the optimizer's name when the trainer was given a class or a factory. The
    checkpoint is the trainer's state after its last evaluation, as ``lls train`` writes it at an
    epoch's end; a resume continues from there with ``seed`` and ``batch_size``. Returns ``path``.
    """
    records = history.records
    if not records:
        raise LLSError("save_run needs the history of at least one epoch of lls.fit")
    if not isinstance(model, str) or not model:
        raise LLSError(f"save_run needs model=: {MODEL_HELP}")
    if dataset not in DATASETS:
        known = ", ".join(DATASETS.names())
        raise LLSError(
            f"save_run needs dataset= a registered dataset ({known}): lls eval, predict and train "
            "--resume read the run's data from it; a run on data of your own cannot be read back by them"
        )
    if trainer.input_shape is None:
        raise LLSError("the trainer has not trained: nothing to save")
    stale = trainer.steps_taken - trainer._statistics_at
    if stale:
        raise LLSError(
            f"the trainer took {stale} step(s) since its last evaluation: save right after lls.fit "
            "(a run's checkpoint holds the statistics of its last evaluation)"
        )
    config = _config(trainer, records, model, dataset, model_options, optimizer, seed, batch_size, limit,
                     holdout, augment, channels_last)  # fmt: skip
    _check_rebuilds(trainer, config)
    run = RunDir.create(path, config, {**environment(), "device": str(next(trainer.net.parameters()).device),
                                       "saved_from": "lls.save_run"})  # fmt: skip
    try:
        state = checkpoint_state(config, trainer.state_dict(), history, len(records), None)
        run.save_checkpoint(state)
        run.write_metrics(history, f"{model} / {dataset} / {trainer.rule.name}")
    finally:
        run.unlock()
    return run.path


def _config(trainer, records, model, dataset, model_options, optimizer, seed, batch_size, limit, holdout,
            augment, channels_last) -> TrainConfig:  # fmt: skip
    step = trainer.config  # the trainer's StepConfig
    given = step.optimizer
    if optimizer is None:
        if not isinstance(given, str):
            raise LLSError(
                f"the trainer's optimizer is {getattr(given, '__name__', type(given).__name__)}: give "
                "save_run optimizer= its registered name (lls list), or build the trainer with one"
            )
        optimizer = given
    if not isinstance(step.lr, (int, float)):
        raise LLSError(
            "save_run records one learning rate: a trainer with per-block rates cannot be saved as a run"
        )
    if trainer.schedulers:
        raise LLSError(
            "save_run cannot record an lr_schedule factory; use lls train --lr-schedule for a scheduled run"
        )
    rule = trainer.rule.config()
    rule.pop("name")
    recorded = {f.name: getattr(step, f.name) for f in dataclasses.fields(StepConfig)}  # the step as run
    recorded.update(
        lr=float(step.lr),
        weight_decay=float(step.weight_decay),
        optimizer=optimizer,
        memory=step.memory if step.memory is None else str(step.memory),
    )
    return TrainConfig(
        dataset=dataset,
        model=model,
        rule=trainer.rule.name,
        rule_options=rule,
        model_options=dict(model_options or {}),
        epochs=len(records),
        batch_size=batch_size,
        seed=seed,
        limit=limit,
        holdout=holdout,
        augment=augment,
        channels_last=channels_last,
        **recorded,
    )


def _check_rebuilds(trainer: Trainer, config: TrainConfig) -> None:
    """The network the config rebuilds must take the trainer's state, or nothing is written."""
    shape = tuple(trainer.input_shape)
    rng = torch.get_rng_state()  # building seeds the global generator: the run's own is put back
    try:
        rebuilt = build_trainer(
            config.model,
            config.rule,
            shape,
            trainer.num_classes,
            rule_options=config.rule_options,
            model_options=config.model_options,
            seed=config.seed,
            device=next(trainer.net.parameters()).device,
            channels_last=False,
            optimizer=config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            engine=config.engine,
            memory=config.memory,
            precision=config.precision,
        )
        rebuilt.load_state_dict(trainer.state_dict())
    except LLSError as error:
        raise LLSError(f"save_run: model={config.model!r} cannot be rebuilt: {error}") from None
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = "the factory" if is_factory(config.model) else "the zoo model"
        raise LLSError(
            f"save_run: {what} {config.model!r} does not build the trainer's network ({first[:160]}); "
            f"give model= {MODEL_HELP}"
        ) from None
    finally:
        torch.set_rng_state(rng)

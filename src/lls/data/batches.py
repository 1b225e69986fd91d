"""Any iterable of ``(x, y)`` batches, a ``torch.utils.data.DataLoader`` over any Dataset included.

:func:`check_batch` is the one check of a batch a trainer is handed (float inputs of the shape the
network takes, one integer label per sample in range), with one line naming what is wrong and the
fix, and it moves the batch to the network's device and dtype. :class:`IterableBatches` gives such
an iterable the epoch interface of lls' own loaders, so ``fit`` trains on it as on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..errors import LLSError

Batch = tuple[torch.Tensor, torch.Tensor]


def check_batch(
    batch: object,
    input_shape: Sequence[int],
    num_classes: int,
    like: torch.Tensor,
    *,
    min_batch: int = 1,
    integer_inputs: bool = False,
) -> Batch:
    """``batch`` as ``(x, y)`` on ``like``'s device, ``x`` in its dtype and ``y`` as int64, or one
    clear error. Labels are range-checked where they are on the CPU (a check on an accelerator
    would wait for it every step; its own loss kernel reports a bad label there)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise LLSError(f"a batch must be a pair (inputs, labels), got {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LLSError(f"a batch must hold two tensors, got ({type(x).__name__}, {type(y).__name__})")
    if integer_inputs and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise LLSError(f"inputs must be integers (the network embeds them), got {x.dtype}")
    if not integer_inputs and not x.is_floating_point():
        raise LLSError(
            f"inputs must be floats, got {x.dtype}: convert them (e.g. x.float() / 255); a model that "
            "takes integers (token ids) is localized with lls.localize(..., example=a batch of them)"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise LLSError(f"labels must be integer class indices, got {y.dtype}: convert them with y.long()")
    if y.dim() != 1 or len(y) != len(x):
        raise LLSError(
            f"labels must be one class index per sample: got labels of shape {tuple(y.shape)} for "
            f"{len(x)} inputs"
        )
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise LLSError(
            f"inputs of shape {tuple(x.shape[1:])} per sample; the network takes {tuple(input_shape)}"
        )
    if len(y) < min_batch:
        raise LLSError(
            f"a training batch of {len(y)} sample(s): BatchNorm needs {min_batch}; "
            "drop the last batch (DataLoader(..., drop_last=True)) or change the batch size"
        )
    if y.device.type == "cpu" and len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise LLSError(
            f"label {bad} is out of range: the network has {num_classes} classes (0..{num_classes - 1})"
        )
    dtype = torch.int64 if integer_inputs else like.dtype
    return x.to(like.device, dtype, non_blocking=True), y.to(like.device, torch.int64, non_blocking=True)


class IterableBatches:
    """The epochs of a re-iterable source of batches (a DataLoader, a list), each batch checked by
    :func:`check_batch`. A DataLoader shuffles with its own generator: an epoch resumed at step k
    skips k of a new order's batches, not the interrupted order's."""

    def __init__(
        self,
        source: Iterable,
        input_shape: Sequence[int],
        num_classes: int,
        like: torch.Tensor,
        *,
        min_batch: int = 1,
        integer_inputs: bool = False,
    ) -> None:
        if iter(source) is source:
            raise LLSError(
                f"a {type(source).__name__} can be read once only; give something every epoch can "
                "read again: a DataLoader, a list of batches"
            )
        self.source, self.input_shape, self.num_classes = source, tuple(input_shape), num_classes
        self.like, self.min_batch, self.device = like, min_batch, like.device
        self.integer_inputs = integer_inputs

    def __len__(self) -> int:
        try:
            steps = len(self.source)
        except TypeError:
            raise LLSError(
                f"a {type(self.source).__name__} without a length; give a DataLoader over a "
                "map-style Dataset or a list of batches"
            ) from None
        last = _last_batch_size(self.source)
        return steps - 1 if steps > 1 and last is not None and last < self.min_batch else steps

    def epoch(self, epoch: int = 0, stream: str = "train", start: int = 0) -> Iterator[Batch]:
        """The checked batches from step ``start`` on. A batch smaller than ``min_batch`` (a
        DataLoader's last) is merged into the one before it, as lls' own loaders do (a batch of one
        sample breaks BatchNorm in training mode; every sample is still seen once per epoch)."""
        held = None  # each batch waits for the next: the last one may have to take it in
        step = 0
        for batch in self.source:
            merged = _merged(held, batch) if held is not None and _size(batch) < self.min_batch else None
            if merged is not None:
                held = merged
                continue
            if held is not None:
                if step >= start:
                    yield self.checked(held)
                step += 1
            held = batch
        if held is not None and step >= start:
            yield self.checked(held)

    def checked(self, batch: object) -> Batch:
        return check_batch(
            batch,
            self.input_shape,
            self.num_classes,
            self.like,
            min_batch=self.min_batch,
            integer_inputs=self.integer_inputs,
        )

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch()


def _size(batch: object) -> int:
    """Samples in ``batch`` (0 when it is not an (inputs, labels) pair: check_batch says why)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return len(batch[1]) if batch[1].dim() else 0
    return 0


def _merged(first: object, last: object) -> tuple | None:
    """Two (inputs, labels) batches as one; None when they do not concatenate (the check of each
    batch then names what is wrong with it)."""
    try:
        return tuple(torch.cat([a, b]) for a, b in zip(first, last, strict=True))
    except (TypeError, RuntimeError, ValueError):
        return None


def _last_batch_size(source: object) -> int | None:
    """The size of ``source``'s last batch where it can be told without reading it: a DataLoader
    over a map-style Dataset that keeps its last batch, or a list of batches; else None."""
    if isinstance(source, Sequence) and source:
        return _size(source[-1])
    batch_size = getattr(source, "batch_size", None)
    dataset = getattr(source, "dataset", None)
    if isinstance(batch_size, int) and not getattr(source, "drop_last", True):
        try:
            left = len(dataset) % batch_size
        except TypeError:
            return None
        return left or batch_size
    return None


def as_batches(source: object, input_shape: Sequence[int], num_classes: int, like: torch.Tensor, **options):
    """``source`` itself when it is one of lls' loaders, else :class:`IterableBatches` over it."""
    if hasattr(source, "epoch"):
        return source
    return IterableBatches(source, input_shape, num_classes, like, **options)


def checked_loaders(cls: type, trainer, loaders: object, test: Iterable | None, *, min_batch: int):
    """``loaders`` (a ``cls``, ``fit``'s Loaders) or training batches with ``test`` batches, every
    source that is not one of lls' loaders read through :class:`IterableBatches` for ``trainer``."""
    if not isinstance(loaders, cls):
        if test is None:
            raise LLSError("fit got training batches without test batches: pass test=... as well")
        loaders = cls(train=loaders, test=test)
    if trainer.input_shape is None:  # a trainer waiting for its first batch: set it up from train's
        trainer.build_for(_first_inputs(loaders.train))
    like, shape, classes = next(trainer.net.parameters()), trainer.input_shape, trainer.num_classes

    integer = getattr(trainer.net, "input_dtype", None) is not None

    def read(source, **options):
        if source is None:
            return None
        return as_batches(source, shape, classes, like, integer_inputs=integer, **options)

    return dataclasses.replace(
        loaders,
        train=read(loaders.train, min_batch=min_batch),
        test=read(loaders.test),
        probe=read(loaders.probe),
    )


def _first_inputs(source: Iterable) -> torch.Tensor:
    """The inputs of ``source``'s first batch, read with the global random state put back, so that
    the epochs that follow (a shuffling DataLoader draws its order from it) are the same as if
    the batch had not been read."""
    state = torch.get_rng_state()
    try:
        batch = next(iter(source), None)
    finally:
        torch.set_rng_state(state)
    if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor):
        raise LLSError("the training batches are empty or not (inputs, labels) pairs: nothing to train on")
    return batch[0]

"""Datasets by name: ``load_dataset("cifar10")``; unknown names list the known ones."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checks import checked
from ..errors import LLSError
from ..registry import Registry
from .base import Augment, Dataset, FileSplit, Split, default_data_root, seeded_generator
from .cifar import CIFAR10, CIFAR100
from .device import DeviceLoader
from .digits import DIGITS
from .images import IMAGEFOLDER, IMAGENETTE, TINYIMAGENET, VWW
from .loader import BatchLoader, StreamLoader, TensorLoader
from .mnist import FASHION_MNIST, MNIST
from .source import Source

DATASETS: Registry[Source] = Registry("dataset")
DRAWS = ("host", "device")  # where a loader draws its random numbers (make_loader)
for _source in (MNIST, FASHION_MNIST, CIFAR10, CIFAR100, IMAGENETTE, TINYIMAGENET, VWW, IMAGEFOLDER, DIGITS):
    DATASETS.register(_source.name)(_source)


def _path(data_dir: str | Path | None) -> Path | None:
    return Path(data_dir).expanduser() if data_dir is not None else None


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int] | None:
    """(input shape, classes) of a registered dataset, without its files; None for imagefolder."""
    return DATASETS.get(name).shape()


@checked
def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    quiet: bool = False,
    augment: str | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset (in memory, or as file lists for the streamed image sets)."""
    return DATASETS.get(name).load(
        _path(data_dir), download=download, quiet=quiet, augment=augment, image_size=image_size
    )


def fetch_dataset(name: str, data_dir: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Download, verify and unpack a dataset with a public download; returns where it is."""
    return DATASETS.get(name).fetch(_path(data_dir), quiet=quiet)


def check_dataset(name: str, data_dir: str | Path | None = None, *, sample: int | None = None) -> list[str]:
    """Verify a dataset's files, counts and shapes; returns report lines (raises on a problem)."""
    return DATASETS.get(name).check(_path(data_dir), sample=sample)


def make_loader(split: Split | FileSplit, batch_size: int, *, draws: str = "host", **options) -> BatchLoader:
    """The right loader for a split: in memory or streamed from files.

    ``draws`` says where shuffling and augmentation draw their random numbers: ``host`` (a CPU
    generator, batch by batch: the same stream on every device), ``device`` (in-memory splits
    only: a whole epoch's numbers at once on the training device, see ``device.py``) or ``auto``
    (device for an in-memory split on a CUDA device, else host: a CPU run draws as it always did).
    """
    if draws == "auto":
        on_cuda = torch.device(options.get("device", "cpu")).type == "cuda"
        draws = "device" if on_cuda and not isinstance(split, FileSplit) else "host"
    if draws not in DRAWS:
        raise LLSError(f"unknown draws {draws!r}; known: {', '.join(DRAWS)}, auto")
    if isinstance(split, FileSplit):
        if draws == "device":
            raise LLSError(
                "device draws need an in-memory dataset, and this one streams from image files; "
                "use host draws"
            )
        return StreamLoader(split, batch_size, **options)
    if draws == "device":
        return DeviceLoader(split, batch_size, **options)
    return TensorLoader(split, batch_size, **options)


def drawn_on(loader: BatchLoader) -> str:
    """Where a loader draws its batches: ``host`` (one stream on every device), or ``device:cpu``
    / ``device:cuda`` (that device's generator, another stream)."""
    return f"device:{loader.device.type}" if isinstance(loader, DeviceLoader) else "host"


__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "Dataset",
    "FileSplit",
    "Source",
    "Split",
    "StreamLoader",
    "TensorLoader",
    "check_dataset",
    "dataset_shape",
    "default_data_root",
    "fetch_dataset",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "seeded_generator",
]

"""Datasets by name: ``load_dataset("cifar10")``; unknown names list the known ones."""

from __future__ import annotations

from pathlib import Path

from ..registry import Registry
from .base import Augment, Dataset, FileSplit, Split, default_data_root, seeded_generator
from .cifar import CIFAR10, CIFAR100
from .digits import DIGITS
from .images import IMAGEFOLDER, IMAGENETTE, TINYIMAGENET, VWW
from .loader import BatchLoader, StreamLoader, TensorLoader, make_loader
from .mnist import FASHION_MNIST, MNIST
from .source import Source

DATASETS: Registry[Source] = Registry("dataset")
for _source in (MNIST, FASHION_MNIST, CIFAR10, CIFAR100, IMAGENETTE, TINYIMAGENET, VWW, IMAGEFOLDER, DIGITS):
    DATASETS.register(_source.name)(_source)


def _path(data_dir: str | Path | None) -> Path | None:
    return Path(data_dir).expanduser() if data_dir is not None else None


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int] | None:
    """(input shape, classes) of a registered dataset, without its files; None for imagefolder."""
    return DATASETS.get(name).shape()


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

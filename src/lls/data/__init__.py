"""Datasets by name: ``load_dataset("fashion-mnist")``; unknown names list the known ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..registry import Registry
from .base import Augment, Dataset, Split, default_data_root
from .digits import load_digits_dataset
from .loader import TensorLoader, seeded_generator
from .mnist import FASHION_MNIST, MNIST, load_idx_dataset

Loader = Callable[[Path | None, bool, bool], Dataset]
DATASETS: Registry[Loader] = Registry("dataset")

DATASETS.register("mnist")(lambda d, dl, q: load_idx_dataset(MNIST, d, dl, q))
DATASETS.register("fashion-mnist")(lambda d, dl, q: load_idx_dataset(FASHION_MNIST, d, dl, q))
DATASETS.register("digits")(lambda d, dl, q: load_digits_dataset())


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = True, quiet: bool = False
) -> Dataset:
    """Load a dataset's train and test splits into memory (downloading it if allowed)."""
    loader = DATASETS.get(name)
    return loader(Path(data_dir).expanduser() if data_dir is not None else None, download, quiet)


__all__ = [
    "DATASETS",
    "Augment",
    "Dataset",
    "Split",
    "TensorLoader",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "seeded_generator",
]

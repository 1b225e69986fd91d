"""Image files of any size as a dataset's model sees its test images (``lls predict FILES``).

File-based sets (imagefolder, imagenette, ...) decode each file as their test split does: the
shorter side resized to the preset's length, then the centre crop of the preset's size. In-memory
sets (Fashion-MNIST, CIFAR, digits) keep images at one size: a file's shorter side is resized to
that size and the centre square kept, and for one-channel sets the RGB image becomes its luma (the
ITU-R 601 weights, as PIL's ``convert("L")``). Normalisation is the dataset's own, done by the
same loader that feeds its test batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import LLSError
from .base import Dataset, FileSplit, Split
from .loader import decode_image

LUMA_WEIGHTS = (19595, 38470, 7471)  # PIL's convert("L"): (R*19595 + G*38470 + B*7471 + 2^15) >> 16


def luma(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 RGB -> (1, H, W) uint8 luma, rounded as PIL rounds it."""
    r, g, b = (rgb[i].astype(np.uint32) * w for i, w in enumerate(LUMA_WEIGHTS))
    return ((r + g + b + (1 << 15)) >> 16).astype(np.uint8)[None]


def read_images(paths: Sequence[str | Path], data: Dataset) -> Split:
    """The image files at ``paths`` as an in-memory split shaped like ``data``'s test images (labels
    are -1: unknown)."""
    test = data.test
    channels, height, width = data.input_shape
    if height != width:
        raise LLSError(f"{data.name} has {height}x{width} images; files are read for square inputs only")
    decoded = []
    for path in paths:
        if not Path(path).is_file():
            raise LLSError(f"{path} is not a file; give image files (or --dataset)")
        if isinstance(test, FileSplit):
            image = decode_image(path, test.resize, test.size, None)
        else:
            image = decode_image(path, height, height, None)
        if channels == 1:
            image = luma(image)
        elif channels != 3:
            raise LLSError(f"{data.name} has {channels}-channel images; files are read as RGB or grey")
        decoded.append(image)
    if not decoded:
        raise LLSError("no image files given; give image files or --dataset")
    images = torch.from_numpy(np.stack(decoded))
    return Split(images, torch.full((len(decoded),), -1, dtype=torch.long))

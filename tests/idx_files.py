"""Writing IDX files (the MNIST format: magic 0 0 TYPE NDIM, big-endian uint32 sizes, big-endian
data) for the tests of the reader; written from the format, apart from the reader it checks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` in IDX format, gzip-compressed if ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array)
    kind = f"{array.dtype.kind}{array.dtype.itemsize}"
    payload = (
        bytes([0, 0, TYPE_CODES[kind], array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.dtype(">" + kind)).tobytes()
    )
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)

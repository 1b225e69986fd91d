"""Reader for the IDX format of MNIST and Fashion-MNIST (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import LLSError

# third byte of the magic number -> big-endian element type
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_DIMS = 16  # images have 3, labels 1; numpy itself stops at 64


def read_idx_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if it ends in ``.gz``."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise LLSError(f"{path} is not a valid gzip file ({error}); delete it and fetch it again") from None
    except OSError as error:
        raise LLSError(f"cannot read {path}: {error.strerror}") from None


def parse_idx(data: bytes, path: Path) -> torch.Tensor:
    """Decode IDX bytes into a tensor, checking the header against the payload size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise LLSError(f"{path} is not an IDX file (bad magic number); delete it and fetch it again")
    ndim = data[3]
    if ndim > MAX_DIMS:
        raise LLSError(
            f"{path} declares {ndim} dimensions (an IDX file of images or labels has at most {MAX_DIMS}); "
            "delete it and fetch it again"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LLSError(f"{path} is truncated inside its header; delete it and fetch it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow to a small size
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise LLSError(
            f"{path} is {state}: header says shape {shape} ({expected} bytes), file has {len(data)}; "
            "delete it and fetch it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def read_idx(path: Path) -> torch.Tensor:
    return parse_idx(read_idx_bytes(path), path)

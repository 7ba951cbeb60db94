"""Reading the IDX files MNIST-style datasets ship in (LeCun's format), optionally gzipped.

Parsed with numpy from the header's declared shape; nothing is unpickled. A file whose header
disagrees with its size is refused instead of being reshaped into garbage.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# The third byte of the magic number names the element type; MNIST-style files use uint8.
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """The array stored in ``path`` (``.gz`` is decompressed), in its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise IdxError(f"{path.name} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise IdxError(f"{path.name}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    want = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != want:
        raise IdxError(f"{path.name}: the header declares shape {shape} ({want} bytes) but the "
                       f"file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))

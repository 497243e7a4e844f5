"""What a dask task needs to read or write part of a FITS image: a small, picklable
description (path, extension or byte offset, shape, dtype) from which the task opens the
file itself. No open file handle, lock or memory map travels to a worker, and a worker
unpickling these imports numpy and astropy.io.fits only."""

from itertools import product as cartesian
from pathlib import Path

import numpy as np
from astropy.io import fits


class FitsExtension:
    """Array-like view of one image extension that reads only the requested slab."""

    def __init__(self, path: Path, extname: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = str(path)
        self.extname = extname
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.ndim = len(shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        with fits.open(self.path, memmap=False, lazy_load_hdus=True) as hdul:
            data = hdul[self.extname].section[key]
        return np.asarray(data, dtype=self.dtype)


def file_dtype(dtype: np.dtype) -> tuple[np.dtype, int | None]:
    """Big-endian storage type and BZERO (unsigned integers are stored offset, as FITS wants)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize > 1:
        return np.dtype(f">i{dtype.itemsize}"), 2 ** (8 * dtype.itemsize - 1)
    return dtype.newbyteorder(">"), None


class FitsRegion:
    """A ``da.store`` target: the data area of one extension inside a FITS file on disk."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = str(path)
        self.offset = offset
        self.shape = shape
        self.file_dtype, self.bzero = file_dtype(dtype)

    def __setitem__(self, key: tuple[slice, ...], block: np.ndarray) -> None:
        """Write ``block`` at ``key``: one contiguous write per run of whole trailing axes."""
        starts = [s.indices(n)[0] for s, n in zip(key, self.shape, strict=True)]
        if self.bzero is not None:
            block = block.astype(np.int64) - self.bzero
        block = np.ascontiguousarray(block, dtype=self.file_dtype)
        # Axes from `split` on are written whole: the block is contiguous in the file there.
        split = len(self.shape)
        while split > 0 and block.shape[split - 1] == self.shape[split - 1]:
            split -= 1
        split = max(split - 1, 0)
        strides = np.cumprod((*self.shape[1:], 1)[::-1])[::-1] * self.file_dtype.itemsize
        with open(self.path, "r+b") as handle:
            for index in cartesian(*(range(n) for n in block.shape[:split])):
                position = sum(
                    (s + i) * st for s, i, st in zip(starts, index, strides, strict=False)
                )
                position += sum(starts[a] * strides[a] for a in range(split, len(self.shape)))
                handle.seek(self.offset + int(position))
                handle.write(block[index].tobytes())

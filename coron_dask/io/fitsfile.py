"""What a dask task needs to read or write part of a FITS image: a small, picklable
description (path, extension or byte offset, shape, dtype) from which the task opens the
file itself. No open file handle, lock or memory map travels to a worker, and a worker
unpickling these imports numpy and coron_dask.core.errors only."""

from collections.abc import Iterator
from itertools import product as cartesian
from pathlib import Path

import numpy as np

from coron_dask.core.errors import CoronInputError


class FitsExtension:
    """Array-like view of one uncompressed, unscaled image extension (unsigned integers
    through BZERO) that reads only the requested slab, straight into the array it returns:
    one contiguous read per run of whole trailing axes, byte order and offset fixed in
    place, so a read needs no memory beyond its result. With ``native=False`` values come
    back in the file's byte order (``dtype`` big-endian; unsigned integers, stored offset
    by BZERO, are still made native): for readers that convert what they read anyway,
    which then swaps the bytes in the same pass."""

    def __init__(
        self,
        path: Path,
        offset: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
        *,
        native: bool = True,
    ) -> None:
        self.path = str(path)
        self.offset = offset
        self.shape = shape
        self.file_dtype, self.bzero = file_dtype(dtype)
        self.native = native or self.bzero is not None
        self.dtype = np.dtype(dtype) if self.native else self.file_dtype
        self.ndim = len(shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges = [range(*k.indices(n)) for k, n in zip(key, self.shape, strict=True)]
        if any(r.step != 1 for r in ranges):
            raise IndexError(f"{self.path}: only contiguous slices can be read, got {key}")
        out = np.empty([len(r) for r in ranges], dtype=self.file_dtype)
        if out.size:
            split = _contiguous_from(out.shape, self.shape)
            strides = np.cumprod((*self.shape[1:], 1)[::-1])[::-1] * out.itemsize
            with open(self.path, "rb") as handle:
                for index in cartesian(*(range(n) for n in out.shape[:split])):
                    position = sum(
                        (r.start + i) * st for r, i, st in zip(ranges, index, strides, strict=False)
                    )
                    position += sum(ranges[a].start * strides[a] for a in range(split, self.ndim))
                    handle.seek(self.offset + int(position))
                    run = memoryview(out[index]).cast("B")
                    if handle.readinto(run) != run.nbytes:
                        raise OSError(f"{self.path}: file ends inside its {self.shape} data")
        if self.native and not out.dtype.isnative:
            out = out.byteswap(inplace=True).view(out.dtype.newbyteorder())
        if self.bzero is not None:  # stored value + 2**(bits-1): flip the sign bit
            out = out.view(self.dtype)
            out ^= self.dtype.type(self.bzero)
        return out


class InputExtension(FitsExtension):
    """An image extension of an input file, read by a task: a read that fails (the file
    removed, cut short or made unreadable since it was checked) is bad input naming the
    file (CoronInputError), not a failure to write the products."""

    def __getitem__(self, key: tuple) -> np.ndarray:
        try:
            return super().__getitem__(key)
        except OSError as error:
            problem = error.strerror or str(error).removeprefix(f"{self.path}: ")
            raise CoronInputError(self.path, f"cannot be read: {problem}") from None


def _contiguous_from(block: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """The first axis from which a block of ``block`` in an array of ``shape`` is one
    contiguous run: every later axis is whole."""
    split = len(shape)
    while split > 0 and block[split - 1] == shape[split - 1]:
        split -= 1
    return max(split - 1, 0)


def file_dtype(dtype: np.dtype) -> tuple[np.dtype, int | None]:
    """Big-endian storage type and BZERO (unsigned integers are stored offset, as FITS wants)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize > 1:
        return np.dtype(f">i{dtype.itemsize}"), 2 ** (8 * dtype.itemsize - 1)
    return dtype.newbyteorder(">"), None


#: Bytes a write converts to the file's byte order at a time: a block is written in runs
#: of at most this size, so a write needs little memory beyond its block.
WRITE_BUFFER = 8 * 2**20


def _pieces(run: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """``run`` as consecutive slabs (in C order) of at most ``limit`` bytes, or of one row
    of its last axis where a row is larger."""
    if run.nbytes <= limit or run.ndim == 1:
        yield run
        return
    step = limit // run[0].nbytes
    if step:
        for start in range(0, run.shape[0], step):
            yield run[start : start + step]
    else:
        for part in run:
            yield from _pieces(part, limit)


class FitsRegion:
    """A write target (``staging.stored``): the data area of one extension inside a FITS
    file on disk."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = str(path)
        self.offset = offset
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.file_dtype, self.bzero = file_dtype(dtype)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FitsRegion) and vars(self) == vars(other)

    def __setitem__(self, key: tuple[slice, ...], block: np.ndarray) -> None:
        """Write ``block`` at ``key``: one seek per run of whole trailing axes, each run
        converted and written WRITE_BUFFER bytes at a time."""
        starts = [s.indices(n)[0] for s, n in zip(key, self.shape, strict=True)]
        # Axes from `split` on are written whole: the block is contiguous in the file there.
        split = _contiguous_from(block.shape, self.shape)
        strides = np.cumprod((*self.shape[1:], 1)[::-1])[::-1] * self.file_dtype.itemsize
        with open(self.path, "r+b") as handle:
            for index in cartesian(*(range(n) for n in block.shape[:split])):
                position = sum(
                    (s + i) * st for s, i, st in zip(starts, index, strides, strict=False)
                )
                position += sum(starts[a] * strides[a] for a in range(split, len(self.shape)))
                handle.seek(self.offset + int(position))
                for piece in _pieces(block[index], WRITE_BUFFER):
                    handle.write(memoryview(self._stored(piece)).cast("B"))

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        """What was written at ``key`` (read back to verify it, or to reuse it)."""
        return FitsExtension(self.path, self.offset, self.shape, self.dtype)[key]

    def _stored(self, run: np.ndarray) -> np.ndarray:
        """A piece of the block as the file stores it (big-endian, unsigned values offset)."""
        stored = run.astype(run.dtype.newbyteorder(">"), order="C")
        if self.bzero is not None:  # stored value = value - 2**(bits-1): flip the sign bit
            stored ^= stored.dtype.type(self.bzero)
        return stored.view(self.file_dtype)

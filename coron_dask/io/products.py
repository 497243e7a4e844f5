"""What a product is: its path, its primary keywords and its extensions, images or tables
(``table``: one lazy block of a few rows, such as psfalign's ALIGN record of the fitted
shifts), in order. ``io.staging`` writes them (FITS, ``io.fits_layout``; or Zarr stores,
``io.zarr_store``), whole or not at all.

Keywords are values or (value, comment) pairs (the comment goes to FITS only); HISTORY
and COMMENT take a list of entries (a list attribute in a Zarr store).
"""

from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from coron_dask.io.fitsfile import FitsExtension


@dataclass
class Extension:
    """One extension: its EXTNAME, a dask (or numpy) array and extra header keywords; an
    image, or a table (a binary table) when the array is 1-D of a structured dtype (``table``)."""

    name: str
    data: da.Array
    keywords: dict = field(default_factory=dict)
    dims: tuple[str, ...] | None = None  # axis names, slowest first (Zarr stores keep them)
    #: written by the tasks that make its blocks (``write_blocks``); None: by a store task
    written: "Written | None" = None
    #: a table's columns: (unit, description) by name (TUNITn and the comment of TTYPEn)
    columns: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def is_table(self) -> bool:
        return self.data.dtype.names is not None


@dataclass(frozen=True)
class Column:
    """One column of a table extension: ``data`` (numpy, or a lazy dask array; text is
    stored as ASCII, of its dtype's length if lazy), its unit ("" for none) and a short
    description."""

    name: str
    data: object
    unit: str = ""
    description: str = ""


#: FITS binary table formats (TFORMn) of the column types a table may hold
_TFORMS = {"u1": "B", "i2": "I", "i4": "J", "i8": "K", "f4": "E", "f8": "D"}


def tform(dtype: np.dtype) -> str:
    if dtype.kind == "S":
        return f"{dtype.itemsize}A"
    code = _TFORMS.get(f"{dtype.kind}{dtype.itemsize}")
    if code is None:
        raise ValueError(f"a table column cannot hold {dtype}")
    return code


def table_block(*columns: np.ndarray, record: np.dtype) -> np.ndarray:
    """The rows of a table, of dtype ``record``, from its ``columns`` in order."""
    rows = np.empty(len(columns[0]), dtype=record)
    for name, values in zip(record.names, columns, strict=True):
        rows[name] = values
    return rows


def table(name: str, columns: list[Column], keywords: dict | None = None) -> Extension:
    """A table extension ``name`` of ``columns`` (of one length): one lazy block, so it is
    computed with the products and written whole (text is stored as ASCII)."""
    arrays, fields = [], []
    for column in columns:
        data = column.data
        if isinstance(data, da.Array):
            if data.dtype.kind == "U":  # as many ASCII characters as the dtype holds
                chars = max(data.dtype.itemsize // 4, 1)
                data = data.map_blocks(np.char.encode, "ascii", dtype=f"S{chars}")
        else:
            data = np.asarray(data)
            if data.dtype.kind == "U":
                data = np.char.encode(data, "ascii")
            if data.dtype.kind == "S":  # text of at least one character (FITS "0A" is odd)
                data = data.astype(f"S{max(data.dtype.itemsize, 1)}")
        tform(data.dtype)
        arrays.append(da.asarray(data).rechunk(-1))
        fields.append((column.name, data.dtype.newbyteorder("=")))
    lengths = {array.shape for array in arrays}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"{name}: columns must be 1-D and of one length, got {lengths}")
    record = np.dtype(fields)
    rows = da.map_blocks(
        table_block,
        *arrays,
        record=record,
        dtype=record,
        name=f"table-{name.lower()}-" + tokenize(*arrays, record),
    )
    described = {column.name: (column.unit, column.description) for column in columns}
    return Extension(name, rows, keywords or {}, ("row",), columns=described)


@dataclass(frozen=True)
class Written:
    """An extension written by the tasks that make its blocks: the array of those tasks,
    and where they write."""

    array: da.Array
    target: object


@dataclass(frozen=True)
class OnDisk:
    """An array that tasks wrote to a file block by block (``write_blocks``): ``written``
    holds each block's summary, its frame means or zone means (a task reading a block back
    depends on it), ``source``
    reads any part of the array (``fitsfile.FitsExtension``)."""

    written: da.Array
    source: FitsExtension


@dataclass
class Product:
    """A FITS product: primary header keywords and its image extensions, in order."""

    path: Path
    primary: dict
    extensions: list[Extension]
    #: a file the run needs only while it runs (what it keeps on disk rather than in
    #: workers' memory): written as a product is, removed at the end, never placed
    scratch: bool = False
    #: its FITS headers and what they were made of (astropy takes ~30 ms a product to
    #: make them; ``fits_layout.fits_headers``)
    _headers: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """What the product is, as its name ends (crfints, psfstack, psfalign, psfsub, i2d,
        snr...), or "scratch": the name its write tasks carry on the dashboard."""
        stem = self.path.name.removesuffix(self.path.suffix)
        return "scratch" if self.scratch else stem.rsplit("_", 1)[-1].lower()

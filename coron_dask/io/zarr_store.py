"""A product as a Zarr store (for products too big for FITS readers): a group with the
primary keywords as attributes and one array per extension, named and labelled as in the
FITS file, readable with ``xarray.open_zarr``; a table is a group of that name with one
array per column (``xarray.open_zarr(store, group=name)``). ``read_store`` reads what a
store holds for ``io.backend``. zarr is imported only when a store is written or read."""

import warnings
from pathlib import Path

import dask.array as da
import numpy as np

from coron_dask.core.errors import CoronInputError
from coron_dask.io.products import Extension, Product


def _zarr():
    """The zarr module, imported on first use (a FITS run never needs it)."""
    import zarr

    return zarr


def _json_value(value: object) -> object:
    """A keyword's value as a Zarr attribute: a (value, comment) pair gives its value, a
    list (HISTORY) stays a list."""
    if isinstance(value, tuple):
        value = value[0]
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value if isinstance(value, bool | int | float | str) or value is None else str(value)


def json_safe(keywords: dict) -> dict:
    plain = {key: _json_value(value) for key, value in keywords.items()}
    return {key: value for key, value in plain.items() if value is not None}


class ZarrArray:
    """A write target (``stored``): one array of a Zarr store on disk, opened by the task that
    writes to it (picklable, like ``FitsRegion``)."""

    def __init__(self, store: Path, name: str) -> None:
        self.store = str(store)
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZarrArray) and vars(self) == vars(other)

    def __setitem__(self, key: tuple[slice, ...], block: np.ndarray) -> None:
        _zarr().open_array(self.store, path=self.name, mode="r+")[key] = block

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        """What was written at ``key`` (read back to verify it, or to reuse it)."""
        return _zarr().open_array(self.store, path=self.name, mode="r")[key]


class ZarrTable:
    """A write target (``stored``): a table of a Zarr store, a group of one array per column,
    whose rows (a structured array) are written column by column (picklable)."""

    def __init__(self, store: Path, name: str) -> None:
        self.store = str(store)
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZarrTable) and vars(self) == vars(other)

    def __setitem__(self, key: tuple[slice, ...], rows: np.ndarray) -> None:
        zarr = _zarr()
        for name in rows.dtype.names:
            values = rows[name]
            if values.dtype.kind == "S":  # stored as Zarr's (specified) UTF-8 strings
                values = values.astype(str)
            zarr.open_array(self.store, path=f"{self.name}/{name}", mode="r+")[key] = values


def zarr_target(partial: Path, extension: Extension) -> "ZarrArray | ZarrTable":
    return (ZarrTable if extension.is_table else ZarrArray)(partial, extension.name)


def _create_zarr_table(group: object, extension: Extension, chunks: tuple[int, ...]) -> None:
    """The group of table ``extension`` in Zarr ``group``: its keywords as attributes, one
    array per column (dimension ``row``) with its ``units`` and ``long_name``."""
    columns = group.create_group(extension.name)
    columns.attrs.update(json_safe(extension.keywords))
    record = extension.data.dtype
    for name in record.names:
        text = record[name].kind == "S"
        array = columns.create_array(
            name,
            shape=extension.data.shape,
            chunks=chunks,
            dtype=str if text else record[name],
            dimension_names=extension.dims or ("row",),
        )
        unit, description = extension.columns.get(name, ("", ""))
        array.attrs.update(json_safe({"units": unit or None, "long_name": description or None}))


def zarr_chunks(data: da.Array) -> tuple[int, ...]:
    """The Zarr chunks of ``data``: its largest block on each axis."""
    return tuple(max(chunks) for chunks in data.chunks)


def reserve_zarr(
    product: Product, partial: Path, *, keep: bool = False
) -> list["ZarrArray | ZarrTable"]:
    """Create the Zarr store of ``product`` in ``partial``, arrays chunked as the data (an
    extension's blocks must each fall in one chunk: ``staged_products`` rechunks the
    data it stores, ``write_blocks`` requires it). With ``keep`` (a run taken up: the
    store holds blocks written before) only its primary attributes are written again."""
    zarr = _zarr()
    group = zarr.open_group(str(partial), mode="r+" if keep else "w", zarr_format=3)
    group.attrs.update(json_safe(product.primary))
    for extension in product.extensions if not keep else ():
        data = da.asarray(extension.data)
        if extension.is_table:
            _create_zarr_table(group, extension, zarr_chunks(data))
            continue
        array = group.create_array(
            extension.name,
            shape=data.shape,
            chunks=zarr_chunks(data),
            dtype=data.dtype,
            dimension_names=extension.dims,
        )
        array.attrs.update(json_safe(extension.keywords))
    with warnings.catch_warnings():  # zarr notes that v3 has no consolidated metadata yet
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(str(partial))  # metadata is final: readers open it at once
    return [zarr_target(partial, extension) for extension in product.extensions]


class ZarrSource:
    """Array-like view of one array of a Zarr store, for reading (``io.backend``): any
    slab of it, the array opened on the first read (picklable: a task opens it itself)."""

    def __init__(self, store: Path, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.store = str(store)
        self.name = name
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._opened = None

    def __getstate__(self) -> dict:
        return {**vars(self), "_opened": None}

    def __getitem__(self, key: tuple) -> np.ndarray:
        if self._opened is None:
            self._opened = _zarr().open_array(self.store, path=self.name, mode="r")
        return np.asarray(self._opened[key])


def read_store(
    path: Path,
) -> tuple[dict, list[tuple[ZarrSource, dict, tuple[int, ...]]], dict[str, tuple[dict, dict]]]:
    """What a store written by ``reserve_zarr`` holds, from its metadata alone: the primary
    keywords; each array (in the store's order) as a ``ZarrSource`` with its keywords and
    its chunks; each table (a group) as its columns, read, and its keywords.
    CoronInputError for a folder that is not a Zarr store."""
    if not (path / "zarr.json").is_file() and not (path / ".zgroup").is_file():
        raise CoronInputError(path, "a folder that is not a Zarr store (no zarr.json)")
    try:
        group = _zarr().open_group(str(path), mode="r")
        images = [
            (ZarrSource(path, name, array.shape, array.dtype), dict(array.attrs), array.chunks)
            for name, array in group.arrays()
        ]
        tables = {
            name: ({column: array[...] for column, array in table.arrays()}, dict(table.attrs))
            for name, table in group.groups()
        }
    except Exception as error:  # zarr raises many kinds for a damaged store
        raise CoronInputError(path, f"not a readable Zarr store ({error})") from None
    return dict(group.attrs), images, tables

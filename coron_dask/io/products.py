"""Writing products in the JWST FITS layout, block by block, whole or not at all.

Each product's headers are written first into a hidden temporary file whose data areas
are reserved (its blocks allocated on disk: ``preallocate``); dask tasks then write
their blocks straight into place (each into a picklable target that opens the file
itself, ``stored``). An extension a later step reads (psfalign's SCI, which KLIP reads)
is written by the tasks that make its blocks and read back by the tasks that use it
(``write_blocks``): handed on in memory, each block waited on a worker until dask got
round to its readers and its write. Only when every block of every product is written
are the temporary files renamed to their JWST names; on any failure they are removed.
Scratch files (what a run keeps on disk rather than in workers' memory) are written the
same way and removed at the end.

A product whose path ends in ``.zarr`` is written as a Zarr store instead (for products
too big for FITS readers): a group with the primary keywords as attributes and one array
per extension, named and labelled as in the FITS file, readable with ``xarray.open_zarr``.

An extension whose data has a structured dtype (``table``: one lazy block of a few rows,
such as psfalign's ALIGN record of the fitted shifts) is a table: a FITS BINTABLE, or in
a Zarr store a group of that name with one array per column (``xarray.open_zarr(store,
group=name)``), written by the same computation as the images, before the file is placed.

Keywords are values or (value, comment) pairs (the comment goes to FITS only); HISTORY
and COMMENT take a list of entries (a list attribute in a Zarr store).
"""

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import dask.array as da
import numpy as np
from astropy.io import fits
from dask.base import tokenize
from dask.layers import ArraySliceDep

from coron_dask.core.errors import CoronInputError, raise_if_stopped
from coron_dask.io.fitsfile import FitsExtension, FitsRegion, file_dtype
from coron_dask.kernels.klip import frame_means

BLOCK = 2880  # FITS record size

log = logging.getLogger(__name__)
COMMENTARY = ("HISTORY", "COMMENT")  # keywords whose cards hold free text, one entry each


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


def _tform(dtype: np.dtype) -> str:
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
        _tform(data.dtype)
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
    holds each block's frame means (a task reading a block back depends on it), ``source``
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
    #: make them; ``_fits_headers``)
    _headers: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """What the product is, as its name ends (crfints, psfstack, psfalign, psfsub, i2d,
        snr...), or "scratch": the name its write tasks carry on the dashboard."""
        stem = self.path.name.removesuffix(self.path.suffix)
        return "scratch" if self.scratch else stem.rsplit("_", 1)[-1].lower()


def _bitpix(file_dtype: np.dtype) -> int:
    return -8 * file_dtype.itemsize if file_dtype.kind == "f" else 8 * file_dtype.itemsize


def _set_keywords(header: fits.Header, keywords: dict) -> None:
    """Set ``keywords`` not yet in ``header``: each a value or a (value, comment) pair; a
    list under HISTORY or COMMENT is one entry each, wrapped onto as many cards as it
    needs (continuation cards indented by two spaces)."""
    for key, value in keywords.items():
        if key in COMMENTARY and isinstance(value, list):
            for entry in value:
                for line in textwrap.wrap(
                    str(entry), 72, subsequent_indent="  ", break_on_hyphens=False
                ) or [""]:
                    with contextlib.suppress(ValueError):
                        header.append((key, line), end=True)
            continue
        if key in header or value is None or (isinstance(value, tuple) and value[0] is None):
            continue
        with contextlib.suppress(ValueError, TypeError, KeyError):
            header[key] = value


def _primary_header(keywords: dict) -> fits.Header:
    header = fits.Header([("SIMPLE", True), ("BITPIX", 8), ("NAXIS", 0), ("EXTEND", True)])
    _set_keywords(header, keywords)
    return header


def _table_header(extension: Extension) -> fits.Header:
    """A BINTABLE header: its rows are ``extension.data``'s records, packed, big-endian."""
    record = extension.data.dtype
    header = fits.Header([("XTENSION", "BINTABLE"), ("BITPIX", 8), ("NAXIS", 2)])
    header["NAXIS1"] = (record.itemsize, "bytes per row")
    header["NAXIS2"] = (extension.data.shape[0], "rows")
    header["PCOUNT"] = 0
    header["GCOUNT"] = 1
    header["TFIELDS"] = len(record.names)
    for number, name in enumerate(record.names, start=1):
        unit, description = extension.columns.get(name, ("", ""))
        header[f"TTYPE{number}"] = (name, description)
        header[f"TFORM{number}"] = _tform(record[name])
        if unit:
            header[f"TUNIT{number}"] = unit
    header["EXTNAME"] = extension.name
    _set_keywords(header, extension.keywords)
    return header


def _extension_header(extension: Extension) -> fits.Header:
    if extension.is_table:
        return _table_header(extension)
    stored, bzero = file_dtype(extension.data.dtype)
    header = fits.Header([("XTENSION", "IMAGE"), ("BITPIX", _bitpix(stored))])
    header["NAXIS"] = extension.data.ndim
    for axis, length in enumerate(reversed(extension.data.shape), start=1):
        header[f"NAXIS{axis}"] = length
    header["PCOUNT"] = 0
    header["GCOUNT"] = 1
    header["EXTNAME"] = extension.name
    if bzero is not None:
        header["BZERO"] = bzero
        header["BSCALE"] = 1
    _set_keywords(header, extension.keywords)
    return header


def _fits_layout(product: Product, partial: Path) -> tuple[list[tuple[bytes, FitsRegion]], int]:
    """The headers of ``product`` in order, each with the region of its data in ``partial``
    (the primary header has none), and the file's size: pure, so a region is known before
    the file exists."""
    primary, *headers = _fits_headers(product)
    layout = [(primary, None)]
    position = len(primary)
    for extension, header in zip(product.extensions, headers, strict=True):
        position += len(header)
        shape, dtype = extension.data.shape, extension.data.dtype
        layout.append((header, FitsRegion(partial, position, shape, dtype)))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        position += -(-nbytes // BLOCK) * BLOCK
    return layout, position


def _fits_headers(product: Product) -> list[bytes]:
    """The primary and extension headers of ``product`` as written, made again only when
    what they are made of changed (a product's layout is asked for by every write task's
    target, and by the check that keywords added later did not move its data)."""
    # what the headers are made of, cheap to compare (astropy's cards are not)
    made_of = repr(
        (
            product.primary,
            [(e.name, e.keywords, e.data.shape, e.data.dtype) for e in product.extensions],
        )
    )
    if product._headers is None or product._headers[0] != made_of:
        headers = [_primary_header(product.primary)]
        headers += [_extension_header(extension) for extension in product.extensions]
        product._headers = (made_of, [h.tostring().encode("ascii") for h in headers])
    return product._headers[1]


def _reserve(product: Product, partial: Path) -> list[FitsRegion]:
    """Write the headers of ``product`` into ``partial``, sized for its data; give the
    regions its extensions' blocks go to."""
    layout, size = _fits_layout(product, partial)
    with open(partial, "wb") as handle:
        for header, region in layout:
            if region is not None:
                handle.seek(region.offset - len(header))
            handle.write(header)
        handle.truncate(size)
        preallocate(handle, size, product.path)
    return [region for _, region in layout[1:]]


def preallocate(handle: BinaryIO, size: int, name: Path) -> None:
    """Give the file of ``handle`` (product ``name``) its disk blocks up to ``size`` bytes
    now (Linux's fallocate), so that the tasks write into allocated blocks, not into a
    sparse file's holes (blocks of a 4-D psfalign written out of order: 1.4 times as fast
    measured on ext4). A disk or a quota too small for the product fails here, before
    anything is computed, and what was allocated is let go at once (ext4 keeps the blocks
    it found before the disk ran out). Where the system or the filesystem cannot (no glibc,
    NFS), the file stays sparse: glibc's posix_fallocate would write a byte into every
    block."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # the 64-bit offsets' entry point, as argtypes declare them (on 32-bit glibc too)
        fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError, TypeError):  # no libc to ask (TypeError: Windows)
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(handle.fileno(), 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            os.ftruncate(handle.fileno(), 0)
            reason = f"{os.strerror(code)}: {size / 1e9:.3g} GB could not be reserved"
            raise OSError(code, reason, str(name))


def _json_value(value: object) -> object:
    """A keyword's value as a Zarr attribute: a (value, comment) pair gives its value, a
    list (HISTORY) stays a list."""
    if isinstance(value, tuple):
        value = value[0]
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value if isinstance(value, bool | int | float | str) or value is None else str(value)


def _json_safe(keywords: dict) -> dict:
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
        import zarr

        zarr.open_array(self.store, path=self.name, mode="r+")[key] = block


class ZarrTable:
    """A write target (``stored``): a table of a Zarr store, a group of one array per column,
    whose rows (a structured array) are written column by column (picklable)."""

    def __init__(self, store: Path, name: str) -> None:
        self.store = str(store)
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZarrTable) and vars(self) == vars(other)

    def __setitem__(self, key: tuple[slice, ...], rows: np.ndarray) -> None:
        import zarr

        for name in rows.dtype.names:
            values = rows[name]
            if values.dtype.kind == "S":  # stored as Zarr's (specified) UTF-8 strings
                values = values.astype(str)
            zarr.open_array(self.store, path=f"{self.name}/{name}", mode="r+")[key] = values


def _zarr_target(partial: Path, extension: Extension) -> "ZarrArray | ZarrTable":
    return (ZarrTable if extension.is_table else ZarrArray)(partial, extension.name)


def _create_zarr_table(group: object, extension: Extension, chunks: tuple[int, ...]) -> None:
    """The group of table ``extension`` in Zarr ``group``: its keywords as attributes, one
    array per column (dimension ``row``) with its ``units`` and ``long_name``."""
    columns = group.create_group(extension.name)
    columns.attrs.update(_json_safe(extension.keywords))
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
        array.attrs.update(_json_safe({"units": unit or None, "long_name": description or None}))


def _zarr_chunks(data: da.Array) -> tuple[int, ...]:
    """The Zarr chunks of ``data``: its largest block on each axis."""
    return tuple(max(chunks) for chunks in data.chunks)


def _reserve_zarr(product: Product, partial: Path) -> list["ZarrArray | ZarrTable"]:
    """Create the Zarr store of ``product`` in ``partial``, arrays chunked as the data (an
    extension's blocks must each fall in one chunk: ``staged_products`` rechunks the
    data it stores, ``write_blocks`` requires it)."""
    import zarr

    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    group.attrs.update(_json_safe(product.primary))
    for extension in product.extensions:
        data = da.asarray(extension.data)
        if extension.is_table:
            _create_zarr_table(group, extension, _zarr_chunks(data))
            continue
        array = group.create_array(
            extension.name,
            shape=data.shape,
            chunks=_zarr_chunks(data),
            dtype=data.dtype,
            dimension_names=extension.dims,
        )
        array.attrs.update(_json_safe(extension.keywords))
    with warnings.catch_warnings():  # zarr notes that v3 has no consolidated metadata yet
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(str(partial))  # metadata is final: readers open it at once
    return [_zarr_target(partial, extension) for extension in product.extensions]


def target(product: Product, name: str) -> "FitsRegion | ZarrArray | ZarrTable":
    """Where extension ``name`` of ``product`` is written, known before the file exists (a
    target the write tasks write blocks into)."""
    partial = _partial(product.path)
    index = next(i for i, item in enumerate(product.extensions) if item.name == name)
    if product.path.suffix == ".zarr":
        return _zarr_target(partial, product.extensions[index])
    layout, _ = _fits_layout(product, partial)
    return layout[1 + index][1]


def reader(product: Product, name: str) -> FitsExtension:
    """What reads back any part of extension ``name`` of FITS ``product`` while it is being
    written (from its partial file), once the tasks that wrote that part have run. Its
    readers (the fit, the shift, KLIP) take what they read to float64: it is read in the
    file's byte order, swapped in that conversion rather than in a pass of its own."""
    region = target(product, name)
    if not isinstance(region, FitsRegion):
        raise ValueError(f"{product.path.name}: only a FITS file is read back")
    return FitsExtension(region.path, region.offset, region.shape, region.dtype, native=False)


def written_by(product: Product, name: str, array: da.Array) -> None:
    """Record that the tasks of ``array`` write extension ``name`` of ``product`` (into
    ``target``): it gets no store task, and the stores must depend on ``array``."""
    extension = next(item for item in product.extensions if item.name == name)
    extension.written = Written(array, target(product, name))


def write_block(block: np.ndarray, where: tuple[slice, ...], to: tuple) -> np.ndarray:
    """Write ``block`` at ``where`` in each of ``to``; give back its frame means (float64,
    one per frame: what a later step reading the block back needs first), as frames of one
    pixel."""
    for item in to:
        item[where] = block
    return frame_means(block)[..., None, None]


def store_block(block: np.ndarray, where: tuple[slice, ...], to: object) -> np.ndarray:
    """Write ``block`` at ``where`` in ``to``; give back one byte (what is written is done
    with)."""
    to[where] = block
    return np.zeros((1,) * block.ndim, np.uint8)


def stored(data: da.Array, product: Product, name: str, to: object) -> da.Array:
    """The tasks that write each block of ``data`` (extension ``name`` of ``product``)
    into ``to``, named after the product (``write-psfsub-sci``: what the dashboard shows)."""
    return da.map_blocks(
        store_block,
        data,
        ArraySliceDep(data.chunks),
        to,
        chunks=tuple((1,) * len(chunks) for chunks in data.chunks),
        dtype=np.uint8,
        meta=np.empty((0,) * data.ndim, np.uint8),
        name=f"write-{product.kind}-{name.lower()}-" + tokenize(data, to),
    )


def write_blocks(name: str, *products: Product) -> OnDisk:
    """Extension ``name`` (the same data in each of ``products``) written by tasks that
    keep nothing: each writes its block and gives back only the block's frame means (its
    last two axes are frames).

    Tasks that read blocks back (from the first FITS product) depend on these instead of
    the data, so no block waits in a worker's memory for them and none is sent between
    workers; dask fuses the write into the task that makes the block when nothing else
    reads the data.
    """
    data = da.asarray(next(e for e in products[0].extensions if e.name == name).data)
    to = tuple(target(item, name) for item in products)
    if any(len(chunks) > 1 for chunks in data.chunks[-2:]):
        raise ValueError(f"{products[0].path.name} {name}: blocks must hold whole frames")
    for item in products:  # each block in one Zarr chunk: of one size, the last no larger
        even = all(set(c[:-1]) <= {c[0]} and c[-1] <= c[0] for c in data.chunks)
        if item.path.suffix == ".zarr" and not even:
            raise ValueError(f"{item.path.name} {name}: blocks {data.chunks} are uneven")
    written = da.map_blocks(
        write_block,
        data,
        ArraySliceDep(data.chunks),  # each block's place in the file
        to,
        chunks=(*data.chunks[:-2], (1,), (1,)),
        dtype=np.float64,
        name=f"write-{products[0].kind}-{name.lower()}-" + tokenize(data, to),
    )[..., 0, 0]
    for item in products:
        written_by(item, name, written)
    fits_file = next(item for item in products if item.path.suffix != ".zarr")
    return OnDisk(written, reader(fits_file, name))


def _check_passed(passed: list[tuple[Product, Written, object]], sources: list[da.Array]):
    """Raise ValueError unless the stores depend on every extension written by the tasks
    that make it (or its blocks would never be written), and it writes where its file was
    reserved."""
    layers = set()
    for source in sources:
        layers.update(source.__dask_graph__().layers)
    for product, written, target in passed:
        if written.array.name not in layers:
            raise ValueError(f"{product.path.name}: written by tasks no product reads")
        if written.target != target:
            raise ValueError(f"{product.path.name}: its layout changed after write_blocks")


def _remove(partial: Path) -> None:
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


def _place(partial: Path, final: Path) -> None:
    if final.is_dir():  # a store from an earlier run: directories cannot be replaced in one go
        shutil.rmtree(final)
    os.replace(partial, final)


def _partial(path: Path) -> Path:
    """The hidden file (or store) ``path`` is written in until it is whole, named after the
    host and process writing it: another run can tell whether its writer is still alive."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_stale_partials(path: Path) -> None:
    """Remove what a killed run left of product ``path`` (SIGKILL, a node lost): partial
    files of this host whose process is gone. Those of other hosts may belong to a run
    still going there: they are reported, not touched."""
    host = socket.gethostname()
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        writer = stale.name.removeprefix(f".{path.name}.").removesuffix(".partial")
        where, _, pid = writer.rpartition(".")
        if where == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(stale)
            log.warning("removed %s, left by an earlier run that was killed", stale)
        elif where != host:
            log.warning("%s is being written, or was left, by a run on %s", stale, where or "?")


def _check_space(products: list[Product]) -> None:
    """Raise CoronInputError, before anything is written, unless the folders of the FITS
    products and scratch files have room for all of them (a Zarr store's compressed size
    is not known beforehand: not counted)."""
    needed: dict[Path, int] = {}
    for item in products:
        if item.path.suffix != ".zarr":
            folder = item.path.parent
            needed[folder] = needed.get(folder, 0) + _fits_layout(item, item.path)[1]
    for folder, size in needed.items():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise CoronInputError(
                folder,
                f"the products and scratch files need {size / 1e9:.1f} GB, "
                f"the disk has {free / 1e9:.1f} GB free",
            )


@contextlib.contextmanager
def staged_products(products: list[Product]) -> Iterator[list[da.Array]]:
    """Yield the lazy writes of ``products``; on a clean exit rename them into place.

    The caller computes the yielded writes (all together, so shared inputs load once).
    Extensions written by the tasks that make them (``write_blocks``) get no store task:
    the other products' stores must depend on them, which is checked, as is the room on
    disk. Any exception (or signal: ``errors.Interrupted``) removes every temporary file
    and leaves no product behind; those an earlier, killed run left are removed first.
    """
    partials = []
    try:
        for item in products:
            item.path.parent.mkdir(parents=True, exist_ok=True)
            clear_stale_partials(item.path)
        _check_space(products)
        sources, writes, passed = [], [], []
        for item in products:
            partial = _partial(item.path)
            partials.append(partial)
            zarr = item.path.suffix == ".zarr"
            reserved = (_reserve_zarr if zarr else _reserve)(item, partial)
            for extension, target in zip(item.extensions, reserved, strict=True):
                if extension.written is not None:  # by the tasks that make its blocks
                    passed.append((item, extension.written, target))
                    continue
                data = da.asarray(extension.data)
                data = data.rechunk(_zarr_chunks(data)) if zarr else data
                sources.append(data)
                writes.append(stored(data, item, extension.name, target))
        # computed together: one graph, so a block several products need (the aligned
        # references: psfalign and psfsub) is computed once
        _check_passed(passed, sources)
        yield writes
        raise_if_stopped()  # a signal recorded while they were computed: none is placed
    except BaseException:
        for partial in partials:
            _remove(partial)
        raise
    try:
        for item, partial in zip(products, partials, strict=True):
            if not item.scratch:
                _place(partial, item.path)
    finally:
        for partial in partials:  # scratch files, and any product not placed
            _remove(partial)


def write_products(products: list[Product], compute=None) -> list[Path]:
    """Write ``products`` with ``compute`` (default ``dask.compute``) and return their paths
    (scratch files are not products)."""
    import dask

    with staged_products(products) as writes:
        (compute or dask.compute)(*writes)
    return [item.path for item in products if not item.scratch]

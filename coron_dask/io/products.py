"""Writing products in the JWST FITS layout, block by block, whole or not at all.

Each product's headers are written first into a hidden temporary file whose data areas
are reserved (a sparse file); dask tasks then write their blocks straight into place
(``da.store`` into a picklable target that opens the file itself). Only when every block
of every product is written are the temporary files renamed to their JWST names; on any
failure they are removed.

A product whose path ends in ``.zarr`` is written as a Zarr store instead (for products
too big for FITS readers): a group with the primary keywords as attributes and one array
per extension, named and labelled as in the FITS file, readable with ``xarray.open_zarr``.

Keywords are values or (value, comment) pairs (the comment goes to FITS only); HISTORY
and COMMENT take a list of entries (a list attribute in a Zarr store).
"""

import contextlib
import logging
import os
import shutil
import socket
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
from astropy.io import fits
from dask.delayed import Delayed

from coron_dask.io.fitsfile import FitsRegion, file_dtype

BLOCK = 2880  # FITS record size

log = logging.getLogger(__name__)
COMMENTARY = ("HISTORY", "COMMENT")  # keywords whose cards hold free text, one entry each


@dataclass
class Extension:
    """One image extension: its EXTNAME, a dask (or numpy) array and extra header keywords."""

    name: str
    data: da.Array
    keywords: dict = field(default_factory=dict)
    dims: tuple[str, ...] | None = None  # axis names, slowest first (Zarr stores keep them)


@dataclass
class Product:
    """A FITS product: primary header keywords and its image extensions, in order."""

    path: Path
    primary: dict
    extensions: list[Extension]


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


def _extension_header(extension: Extension) -> fits.Header:
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


def _reserve(product: Product, partial: Path) -> list[tuple[da.Array, FitsRegion]]:
    """Write the headers of ``product`` into ``partial``, sized for its data; give the targets."""
    targets = []
    with open(partial, "wb") as handle:
        handle.write(_primary_header(product.primary).tostring().encode("ascii"))
        for extension in product.extensions:
            handle.write(_extension_header(extension).tostring().encode("ascii"))
            nbytes = int(np.prod(extension.data.shape)) * np.dtype(extension.data.dtype).itemsize
            region = FitsRegion(partial, handle.tell(), extension.data.shape, extension.data.dtype)
            targets.append((da.asarray(extension.data), region))
            handle.seek(handle.tell() + -(-nbytes // BLOCK) * BLOCK)
        handle.truncate()
    return targets


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


def _reserve_zarr(product: Product, partial: Path) -> list[tuple[da.Array, object]]:
    """Create the Zarr store of ``product`` in ``partial``, arrays chunked as the data."""
    import zarr

    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    group.attrs.update(_json_safe(product.primary))
    targets = []
    for extension in product.extensions:
        data = da.asarray(extension.data)
        regular = tuple(max(chunks) for chunks in data.chunks)
        data = data.rechunk(regular)
        array = group.create_array(
            extension.name,
            shape=data.shape,
            chunks=regular,
            dtype=data.dtype,
            dimension_names=extension.dims,
        )
        array.attrs.update(_json_safe(extension.keywords))
        targets.append((data, array))
    with warnings.catch_warnings():  # zarr notes that v3 has no consolidated metadata yet
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(str(partial))  # metadata is final: readers open it at once
    return targets


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


@contextlib.contextmanager
def staged_products(products: list[Product]) -> Iterator[list[Delayed]]:
    """Yield the lazy writes of ``products``; on a clean exit rename them into place.

    The caller computes the yielded writes (all together, so shared inputs load once).
    Any exception (or signal: ``errors.Interrupted``) removes every temporary file and
    leaves no product behind; those an earlier, killed run left are removed first.
    """
    partials = []
    try:
        sources, targets = [], []
        for item in products:
            item.path.parent.mkdir(parents=True, exist_ok=True)
            clear_stale_partials(item.path)
            partial = _partial(item.path)
            partials.append(partial)
            reserve = _reserve_zarr if item.path.suffix == ".zarr" else _reserve
            for source, target in reserve(item, partial):
                sources.append(source)
                targets.append(target)
        # one store for all products: one graph, so a block several products need (the
        # aligned references: psfalign and psfsub) is computed once
        yield [da.store(sources, targets, lock=False, compute=False)]
    except BaseException:
        for partial in partials:
            _remove(partial)
        raise
    placed = 0
    try:
        for item, partial in zip(products, partials, strict=True):
            _place(partial, item.path)
            placed += 1
    finally:
        for partial in partials[placed:]:
            _remove(partial)


def write_products(products: list[Product], compute=None) -> list[Path]:
    """Write ``products`` with ``compute`` (default ``dask.compute``) and return their paths."""
    import dask

    with staged_products(products) as writes:
        (compute or dask.compute)(*writes)
    return [item.path for item in products]

"""The JWST FITS layout of a product: its headers, where each extension's data starts
(known before the file exists, so that write tasks can be given their regions), and the
file reserved on disk with its headers written and its data area allocated
(``preallocate``)."""

import contextlib
import ctypes
import errno
import os
import textwrap
from pathlib import Path
from typing import BinaryIO

import numpy as np
from astropy.io import fits

from coron_dask.io.fitsfile import FitsRegion, file_dtype
from coron_dask.io.products import Extension, Product, tform

BLOCK = 2880  # FITS record size
COMMENTARY = ("HISTORY", "COMMENT")  # keywords whose cards hold free text, one entry each


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
        header[f"TFORM{number}"] = tform(record[name])
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


def fits_layout(product: Product, partial: Path) -> tuple[list[tuple[bytes, FitsRegion]], int]:
    """The headers of ``product`` in order, each with the region of its data in ``partial``
    (the primary header has none), and the file's size: pure, so a region is known before
    the file exists."""
    primary, *headers = fits_headers(product)
    layout = [(primary, None)]
    position = len(primary)
    for extension, header in zip(product.extensions, headers, strict=True):
        position += len(header)
        shape, dtype = extension.data.shape, extension.data.dtype
        layout.append((header, FitsRegion(partial, position, shape, dtype)))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        position += -(-nbytes // BLOCK) * BLOCK
    return layout, position


def fits_headers(product: Product) -> list[bytes]:
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


def reserve_fits(product: Product, partial: Path, *, keep: bool = False) -> list[FitsRegion]:
    """Write the headers of ``product`` into ``partial``, sized for its data; give the
    regions its extensions' blocks go to. With ``keep`` (a run taken up: the file holds
    blocks written before, and the layout is the same) only the headers are written
    again (they carry the run's date), the data left as they are."""
    layout, size = fits_layout(product, partial)
    with open(partial, "r+b" if keep else "wb") as handle:
        for header, region in layout:
            if region is not None:
                handle.seek(region.offset - len(header))
            handle.write(header)
        if not keep:
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

"""Lazy reading of JWST ``_calints`` FITS files into xarray Datasets backed by dask.

A task receives a small, picklable description of what to read (``fitsfile.FitsExtension``)
and opens the file itself: no open file handle, lock or memory map travels to a worker.
"""

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from dask.base import tokenize

from coron_dask.core.errors import CoronInputError
from coron_dask.io.fitsfile import InputExtension

log = logging.getLogger(__name__)

#: Keywords that describe a FITS HDU's layout rather than the data: never carried over.
STRUCTURAL = frozenset(
    {
        "SIMPLE",
        "BITPIX",
        "NAXIS",
        "EXTEND",
        "XTENSION",
        "PCOUNT",
        "GCOUNT",
        "EXTNAME",
        "EXTVER",
        "BZERO",
        "BSCALE",
        "COMMENT",
        "HISTORY",
        "",
        "CHECKSUM",
        "DATASUM",
    }
)
EXTENSIONS = ("SCI", "ERR", "DQ")
#: Read when present: the read-noise variance, which weighs the i2d as jwst's resample does.
OPTIONAL = ("VAR_RNOISE",)


def header_keywords(header: fits.Header) -> dict:
    """The non-structural keywords of ``header`` as a plain dict (the last value wins)."""
    return {
        key: value
        for key, value in header.items()
        if key not in STRUCTURAL and not key.startswith("NAXIS")
    }


def _image_dtype(header: fits.Header) -> np.dtype:
    """The native dtype astropy gives an image HDU's data (unsigned through BZERO)."""
    bitpix = header["BITPIX"]
    if bitpix < 0:
        return np.dtype(f"f{-bitpix // 8}")
    if bitpix > 8 and header.get("BZERO") == 2 ** (bitpix - 1) and header.get("BSCALE", 1) == 1:
        return np.dtype(f"u{bitpix // 8}")
    return np.dtype("u1" if bitpix == 8 else f"i{bitpix // 8}")


def _open_checked(path: Path) -> fits.HDUList:
    """``path`` opened, every header read; or CoronInputError naming it: missing, a
    folder, not readable (permissions, I/O), not FITS, or truncated (astropy only warns)."""
    if not path.exists():
        raise CoronInputError(path, "file not found")
    if path.is_dir():
        raise CoronInputError(path, "is a folder, not a FITS file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*truncated", category=AstropyUserWarning)
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except OSError as error:
        if error.errno is None:  # astropy's word for what is not FITS
            raise CoronInputError(path, f"not a readable FITS file ({error})") from None
        raise CoronInputError(path, f"cannot be read: {error.strerror}") from None
    except AstropyUserWarning as error:  # "File may have been truncated: ..."
        raise CoronInputError(path, f"truncated FITS file ({error})") from None
    except Exception as error:  # astropy raises many kinds for a damaged file
        raise CoronInputError(path, f"not a readable FITS file ({error})") from None
    return hdul


def check_plain(path: object, name: str, header: fits.Header) -> None:
    """Raise CoronInputError unless extension ``name`` is an uncompressed, unscaled image
    (unsigned integers through BZERO): what ``FitsExtension`` reads."""
    if header.get("ZIMAGE"):
        raise CoronInputError(path, f"{name} is tile-compressed; expected a plain image")
    dtype = _image_dtype(header)
    bzero = header.get("BZERO", 0) if dtype.kind != "u" else 0
    if header.get("BSCALE", 1) != 1 or bzero != 0:
        raise CoronInputError(path, f"{name} is scaled (BSCALE/BZERO); expected raw values")


def _data_offset(path: str, hdu: fits.ImageHDU) -> int:
    """Where the data of an uncompressed, unscaled image extension start in its file."""
    if isinstance(hdu, fits.CompImageHDU):
        raise CoronInputError(path, f"{hdu.name} is tile-compressed; expected a plain image")
    check_plain(path, hdu.name, hdu.header)
    return hdu.fileinfo()["datLoc"]


@functools.lru_cache(maxsize=4096)
def _headers(path: str, mtime_ns: int, size: int) -> tuple[dict, dict, dict, dict, dict]:
    """Primary and SCI keywords, shapes, dtypes and data offsets of SCI/ERR/DQ: read once
    per file version (planning and checking open an association more than once)."""
    with _open_checked(Path(path)) as hdul:
        names = {hdu.name for hdu in hdul}
        missing = [name for name in EXTENSIONS if name not in names]
        if missing:
            raise CoronInputError(path, f"missing extension(s) {', '.join(missing)}")
        primary = header_keywords(hdul[0].header)
        sci_header = header_keywords(hdul["SCI"].header)
        present = (*EXTENSIONS, *(name for name in OPTIONAL if name in names))
        shapes = {name: tuple(hdul[name].shape) for name in present}
        dtypes = {name: _image_dtype(hdul[name].header) for name in present}
        offsets = {name: _data_offset(path, hdul[name]) for name in present}
    return primary, sci_header, shapes, dtypes, offsets


DIMS = ("integration", "y", "x")


def open_exposure(path: str | Path, chunks: dict[str, int] | None = None) -> xr.Dataset:
    """Open a ``_calints`` file lazily: ``sci``, ``err``, ``dq`` (and ``var_rnoise`` where
    the file has VAR_RNOISE) with dims (integration, y, x).

    Primary header keywords go into the Dataset's attrs, SCI header keywords into ``sci.attrs``.
    ``chunks`` gives the dask block size along any of the dims (missing or -1: whole), as
    xarray's ``open_dataset``; by default a block is the whole exposure. Each block is read
    straight from the file by its own task.
    """
    path = Path(path)
    if not path.exists():
        raise CoronInputError(path, "file not found")
    stat = path.stat()
    primary, sci_header, shapes, dtypes, offsets = _headers(
        str(path), stat.st_mtime_ns, stat.st_size
    )
    shape = shapes["SCI"]
    if len(shape) != 3:
        raise CoronInputError(
            path, f"SCI has {len(shape)} dimension(s); expected 3 (integration, y, x)"
        )
    for name in shapes:
        if shapes[name] != shape:
            raise CoronInputError(path, f"{name} has shape {shapes[name]}, SCI has {shape}")
    chunks = chunks or {}
    unknown = set(chunks) - set(DIMS)
    if unknown:
        raise ValueError(f"chunks name unknown dims {sorted(unknown)}; the dims are {DIMS}")
    blocks = tuple(
        n if chunks.get(dim, -1) in (-1, None) else max(1, min(int(chunks[dim]), n))
        for dim, n in zip(DIMS, shape, strict=True)
    )
    token = tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, blocks)
    variables = {}
    for name in shapes:
        dtype = dtypes[name]
        proxy = InputExtension(path.resolve(), offsets[name], shape, dtype)
        data = da.from_array(
            proxy,
            chunks=blocks,
            lock=False,
            asarray=False,
            name=f"read-{name.lower()}-{token}",
            meta=np.empty((0, 0, 0), dtype),
        )
        variables[name.lower()] = (DIMS, data)
    nints = shape[0]
    dataset = xr.Dataset(
        variables, coords={"integration": np.arange(1, nints + 1)}, attrs=dict(primary)
    )  # a copy: the header cache must not change
    dataset["sci"].attrs.update(sci_header)
    dataset.encoding["source"] = str(path)
    return dataset


def read_psfmask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """The PSFMASK weights (SCI extension, 0 = pixel ignored by the alignment fit) as float64."""
    path = Path(path)
    with _open_checked(path) as hdul:
        if "SCI" not in {hdu.name for hdu in hdul}:
            raise CoronInputError(path, "PSFMASK has no SCI extension")
        mask = np.asarray(hdul["SCI"].data, dtype=np.float64)
    if mask.shape != tuple(shape):
        raise CoronInputError(
            path, f"PSFMASK has shape {mask.shape}, the frames are {tuple(shape)}"
        )
    if not np.all(np.isfinite(mask)) or not np.any(mask != 0):
        raise CoronInputError(path, "PSFMASK has no usable weights (all zero or not finite)")
    return mask


#: FITS's record: headers and data areas are padded to whole records.
RECORD = 2880


@dataclass(frozen=True)
class HduHeader:
    """One HDU of a FITS file as its header says: the header, where its data start and
    how many bytes they hold (padding excluded)."""

    header: fits.Header
    offset: int
    nbytes: int

    @property
    def name(self) -> str:
        """EXTNAME, as astropy names an HDU ("PRIMARY" for the first, "" for none)."""
        return str(self.header.get("EXTNAME", "PRIMARY" if "SIMPLE" in self.header else ""))


def _data_bytes(header: fits.Header) -> int:
    """The bytes of an HDU's data, from its header (FITS standard, 4.4.1)."""
    naxis = header.get("NAXIS", 0)
    axes = [header.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
    if axes and axes[0] == 0 and header.get("GROUPS"):  # random groups: NAXIS1 is 0
        axes = axes[1:]
    elements = int(np.prod(axes, dtype=np.int64)) if axes else 0
    count = header.get("GCOUNT", 1) * (header.get("PCOUNT", 0) + elements)
    return abs(header["BITPIX"]) // 8 * count


def read_headers(path: Path) -> list[HduHeader]:
    """Every HDU's header of the FITS file at ``path``, and where its data lie, read header
    by header, seeking past the data: a 16 GB product costs its few kB of headers (astropy
    reads an HDU's data when asked whether it has any). CoronInputError for what is not
    a FITS file."""
    size = path.stat().st_size
    hdus: list[HduHeader] = []
    with open(path, "rb") as handle:
        while handle.tell() < size:
            start = handle.tell()
            first = handle.read(8)
            handle.seek(start)
            if first != (b"XTENSION" if hdus else b"SIMPLE  "):
                if not hdus:
                    raise CoronInputError(path, "not a FITS file (no SIMPLE card first)")
                log.warning("%s: %d bytes after the last HDU ignored", path, size - start)
                break
            try:
                header = fits.Header.fromfile(handle)
            except Exception as error:  # astropy raises many kinds for a damaged header
                raise CoronInputError(path, f"not a readable FITS file ({error})") from None
            hdus.append(HduHeader(header, handle.tell(), _data_bytes(header)))
            handle.seek(hdus[-1].offset + -(-hdus[-1].nbytes // RECORD) * RECORD)
    if not hdus:
        raise CoronInputError(path, "not a FITS file (empty)")
    if hdus[-1].offset + hdus[-1].nbytes > size:
        raise CoronInputError(path, f"the file ends inside {hdus[-1].name}'s data (truncated)")
    return hdus


#: The numpy types of binary table columns (TFORMn's letter), big-endian as stored.
_COLUMN_TYPES = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def read_table(path: Path, hdu: HduHeader) -> np.ndarray:
    """The rows of binary table ``hdu`` (a structured array; text as bytes), read from its
    data area alone."""
    header = hdu.header
    fields = []
    for number in range(1, header["TFIELDS"] + 1):
        name, form = header[f"TTYPE{number}"], str(header[f"TFORM{number}"]).strip()
        repeat, code = int(form[:-1] or 1), form[-1]
        if code == "A":
            fields.append((name, f"S{repeat}"))
        elif code in _COLUMN_TYPES:
            fields.append(
                (name, _COLUMN_TYPES[code], (repeat,))
                if repeat > 1
                else (name, _COLUMN_TYPES[code])
            )
        else:
            raise CoronInputError(path, f"{hdu.name} column {name} has format {form}, not read")
    record = np.dtype(fields)
    if record.itemsize != header["NAXIS1"]:
        raise CoronInputError(
            path, f"{hdu.name} rows are {header['NAXIS1']} bytes, its columns {record.itemsize}"
        )
    with open(path, "rb") as handle:
        handle.seek(hdu.offset)
        return np.frombuffer(handle.read(hdu.nbytes), dtype=record, count=header["NAXIS2"])
